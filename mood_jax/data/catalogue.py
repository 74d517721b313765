"""The data catalogue: `source(data_cfg)` is the one place where data.name chooses a Source.

Adding a source: one `sources.source.Source` subclass in mood_jax/data/sources/, listed in
SOURCES here (docs/extending.md).
"""

from mood_jax.data.sources import embedded, grayscale, labelled_folder, tfds_dataset
from mood_jax.data.sources.source import Source

SOURCES = (embedded.EmbeddedSource, tfds_dataset.TfdsSource, grayscale.GrayscaleSource,
           labelled_folder.LabelledFolderSource)


def source(data_cfg) -> Source:
  """The Source that data.name names, reading `data_cfg`."""
  name = data_cfg.name
  for candidate in SOURCES:
    if name in candidate.NAMES or (candidate.PREFIX and name.startswith(candidate.PREFIX)):
      return candidate(data_cfg)
  names = [n for candidate in SOURCES for n in candidate.NAMES]
  prefixed = ' or '.join(f'{candidate.PREFIX}NAME ({candidate.PREFIX_MEANS})'
                         for candidate in SOURCES if candidate.PREFIX)
  raise ValueError(f'unknown data.name {name!r}; valid: {names} or {prefixed}')
