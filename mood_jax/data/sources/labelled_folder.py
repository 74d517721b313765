"""A labelled image folder as ID data (data.name='folder:NAME'), built by
`python -m mood_jax.data.folder --labelled`: its splits 'train' and 'test', its classes in its
metadata."""

import tensorflow_datasets as tfds

from mood_jax.data import folder
from mood_jax.data.sources import source
from mood_jax.data.sources.location import Location


class LabelledFolderSource(source.Source):
  """Records in the order listed; labels index the class names it was built with."""

  PREFIX = folder.PREFIX
  PREFIX_MEANS = 'a labelled image folder built by `python -m mood_jax.data.folder --labelled`'

  @property
  def _folder_name(self) -> str:
    return self.cfg.name[len(self.PREFIX):]

  def class_label(self) -> tfds.features.ClassLabel:
    # Its classes are in the dataset, not in a builder's code.
    return tfds.features.ClassLabel(names=folder.class_names(self._folder_name, self.data_dir))

  def _id_location(self, which: str) -> Location:
    return Location(self.cfg.name, folder.MoodFolder.name,
                    folder.TRAIN_SPLIT if which == 'id_train' else folder.SPLIT,
                    folder.FolderConfig(name=self._folder_name))

  def prepare_command(self, location: Location, data_dir: str) -> str:
    if location.name != self.cfg.name:
      return super().prepare_command(location, data_dir)
    return f'`{folder.prepare_command(self._folder_name, data_dir, labelled=True)}`'
