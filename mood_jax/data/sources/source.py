"""The Source interface: where a config's data is (`catalogue.source` chooses one by data.name).

A source says where its ID splits ('id_train', 'id_test') and any OOD sets of its own are, what
its classes are and how it groups OOD sets; every source also reads the shared sets of
`ood_sets`, and '<data.name>_heldout' (the ID test split's classes outside data.id_classes).
The rules on top (which classes are ID, which records each set keeps, validation sets, what
must be prepared) are the same for every source, and are here. Two of them keep the test
splits out of every choice: 'id_val', a seeded stratified part of ID train that training never
reads (data.id_val_fraction), and '<data.name>_heldout_val', the ID train images of the
classes in data.heldout_validation_classes, a near-OOD validation set.
"""

import abc
import os

import numpy as np
import tensorflow_datasets as tfds

from mood_jax.data.sources import ood_sets
from mood_jax.data.sources.location import Location
from mood_jax.errors import UserError

ID_SPLITS = ('id_train', 'id_test')
ID_VAL = 'id_val'  # the ID validation split, when data.id_val_fraction > 0
HELDOUT_SUFFIX = '_heldout'
HELDOUT_VALIDATION_SUFFIX = '_heldout_val'


class Source(abc.ABC):
  """The data of one `config.data`: its ID dataset's splits and classes, and its OOD sets."""

  NAMES: tuple[str, ...] = ()  # the data.name values it serves,
  PREFIX = ''                  # or those that start with this
  PREFIX_MEANS = ''            # what PREFIX names, for error messages
  channels = 3                 # of every image as read (`transforms.Decode` converts)
  # True: its own images are stored at data.image_size (the embedded sets), so they are not
  # resized, any others are resized to it when read, and training translates them, not crops.
  fixed_size = False
  label_key = 'label'          # the class feature of the ID dataset's records
  own_ood_sets: tuple[str, ...] = ()    # OOD sets stored with the ID data, besides held-out
  near_ood_sets: tuple[str, ...] = ()   # OOD sets in group 'near', besides held-out

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.data_dir = os.path.expanduser(data_cfg.data_dir)

  # --- What each source says.

  @abc.abstractmethod
  def class_label(self) -> tfds.features.ClassLabel:
    """Every class of the ID dataset (with its names, which data.id_classes may use)."""

  @abc.abstractmethod
  def _id_location(self, which: str) -> Location:
    """Where 'id_train' or 'id_test' is."""

  def _own_ood_location(self, name: str) -> Location | None:
    """Where OOD set `name` is, if it is one of `own_ood_sets`."""
    del name
    return None

  def ood_group(self, name: str) -> str:
    """'near', 'far' or 'validation' (data.validation_ood_sets are validation too)."""
    return 'near' if name == self.heldout_set or name in self.near_ood_sets else 'far'

  def prepare_command(self, location: Location, data_dir: str) -> str:
    """How to make `location` in data_dir: by default, what makes `location.name`."""
    return ood_sets.prepare_command(location.name, data_dir)

  # --- Where each set is.

  @property
  def heldout_set(self) -> str:
    return self.cfg.name + HELDOUT_SUFFIX

  @property
  def heldout_validation_set(self) -> str:
    return self.cfg.name + HELDOUT_VALIDATION_SUFFIX

  def has_id_val(self) -> bool:
    """Whether part of ID train is held out as 'id_val' (configs saved before the field
    existed have none)."""
    return self.cfg.get('id_val_fraction', 0.0) > 0

  def id_sets(self) -> tuple[str, ...]:
    """The ID sets that can be read: 'id_train', 'id_test', and 'id_val' if there is one."""
    return (*ID_SPLITS, ID_VAL) if self.has_id_val() else ID_SPLITS

  def locate(self, which: str) -> Location:
    """Where 'id_train', 'id_test', 'id_val' or OOD set `which` is."""
    if which in ID_SPLITS:
      return self._id_location(which)
    if which == ID_VAL:
      if not self.has_id_val():
        raise ValueError(f"'{ID_VAL}' is a part of ID train held out of training: set "
                         'data.id_val_fraction > 0, e.g. 0.2')
      return self._id_location('id_train')
    found = self._ood_location(which)
    if found is None:
      raise self._unknown('eval set', which, [*self.id_sets(), *self._ood_set_names()])
    return found

  def _ood_location(self, name: str) -> Location | None:
    if name == self.heldout_set:
      if not self._heldout_classes():
        raise ValueError(f'{name!r} is the test images of classes outside id_classes, but '
                         'id_classes (with data.heldout_validation_classes) covers all '
                         'classes: choose a subset, or drop it from ood_sets')
      return self._id_location('id_test')
    if name == self.heldout_validation_set:
      if not self.heldout_validation_classes():
        raise ValueError(f'{name!r} is the ID train images of data.heldout_validation_classes:'
                         ' name one or more classes outside id_classes there')
      return self._id_location('id_train')
    return self._own_ood_location(name) or ood_sets.location(name, self.cfg.name)

  def _ood_set_names(self) -> list[str]:
    return [self.heldout_set, self.heldout_validation_set, *self.own_ood_sets,
            *ood_sets.tfds_names(self.cfg.name)]

  def _unknown(self, what: str, name: str, valid: list[str]) -> ValueError:
    return ValueError(f'unknown {what} {name!r} for data.name={self.cfg.name!r}: valid: {valid} '
                      f'or {ood_sets.NAMED}')

  def example_ids(self, which: str, indices) -> np.ndarray:
    """Each example's id, from its split `indices` (`Location.example_ids`)."""
    return self.locate(which).example_ids(self.data_dir, indices)

  # --- Classes.

  def all_classes(self) -> tuple[int, ...]:
    """Every class of the ID dataset, as indices (whatever data.id_classes selects)."""
    return tuple(range(self.class_label().num_classes))

  def _class_index(self, label: int | str) -> int | str:
    """A class given by index, or by label name (e.g. ImageNet's wnid)."""
    if isinstance(label, str):
      names = self.class_label().names
      return names.index(label) if label in names else label
    return label

  def id_classes(self) -> tuple[int, ...]:
    """Sorted ID classes: the ones asked for, or all of them."""
    all_classes = self.all_classes()
    if not self.cfg.id_classes:
      return all_classes
    asked = {self._class_index(c) for c in self.cfg.id_classes}
    unknown = asked - set(all_classes)
    if unknown:
      raise ValueError(f'id_classes {sorted(unknown, key=str)} are not among the classes of '
                       f'{self.cfg.name} (0..{len(all_classes) - 1}, or their TFDS label names)')
    return tuple(sorted(asked))

  def head_classes(self) -> tuple[int, ...]:
    """The classes the classifier has a logit for, in logit order."""
    return self.all_classes() if self.cfg.head_all_classes else self.id_classes()

  def num_classes(self) -> int:
    return len(self.head_classes())

  def heldout_validation_classes(self) -> tuple[int, ...]:
    """Sorted classes outside id_classes whose ID train images are a near-OOD validation set."""
    asked = {self._class_index(c) for c in self.cfg.get('heldout_validation_classes') or ()}
    inside = asked & set(self.id_classes())
    unknown = asked - set(self.all_classes())
    if inside or unknown:
      raise ValueError(f'data.heldout_validation_classes {sorted(inside | unknown, key=str)} '
                       f'must be classes of {self.cfg.name} outside data.id_classes')
    return tuple(sorted(asked))

  def _heldout_classes(self) -> tuple[int, ...]:
    """The classes of '<name>_heldout': neither ID nor held out for validation."""
    taken = {*self.id_classes(), *self.heldout_validation_classes()}
    return tuple(c for c in self.all_classes() if c not in taken)

  # --- Which records each set keeps, and with which labels.

  def has_id_labels(self, which: str) -> bool:
    """Whether `which`'s labels are ID dataset classes; any other set's examples are all OOD."""
    return which in self.id_sets() or which in (self.heldout_set, self.heldout_validation_set)

  def kept_indices(self, which: str) -> list[int] | None:
    """Indices of the records that `which` keeps from its split; None keeps every record."""
    if which in ('id_train', ID_VAL) and self.has_id_val():
      id_val = self._id_val_indices()
      if which == ID_VAL:
        return id_val.tolist()
      return np.setdiff1d(self._of_classes('id_train', self.id_classes()), id_val).tolist()
    id_classes, all_classes = set(self.id_classes()), set(self.all_classes())
    if which == self.heldout_set:
      kept = self._heldout_classes()
    elif which == self.heldout_validation_set:
      kept = self.heldout_validation_classes()
    elif which in ID_SPLITS and id_classes != all_classes:
      kept = id_classes
    else:
      return None
    return self._of_classes(which, kept).tolist()

  def _of_classes(self, which: str, classes) -> np.ndarray:
    """Sorted indices of `which`'s records whose label is one of `classes`."""
    labels = self.locate(which).labels(self.data_dir, self.label_key)
    return np.flatnonzero(np.isin(labels, sorted(classes)))

  def _id_val_indices(self) -> np.ndarray:
    """Sorted indices of the ID train records held out as 'id_val': data.id_val_fraction of
    each ID class (stratified, as sklearn's train_test_split(stratify=)), drawn with
    data.split_seed, so the same rows whatever the run's seed."""
    labels = self._id_location('id_train').labels(self.data_dir, self.label_key)
    rng = np.random.default_rng(self.cfg.split_seed)
    held = []
    for label in self.id_classes():  # sorted: the draws do not depend on config order
      rows = np.flatnonzero(labels == label)
      count = int(round(self.cfg.id_val_fraction * len(rows)))
      held.append(rng.permutation(rows)[:count])
    held = np.sort(np.concatenate(held))
    if not len(held):
      raise UserError(f'data.id_val_fraction={self.cfg.id_val_fraction} holds out no ID train '
                      'image of any class: raise it, e.g. to 0.2')
    return held

  # --- OOD groups.

  def ood_groups(self) -> dict[str, str]:
    """OOD set name -> 'near' | 'far' | 'validation', in config order."""
    for name in self.cfg.ood_sets:
      if self._ood_location(name) is None:
        raise self._unknown('OOD set', name, self._ood_set_names())
    validation = self.cfg.get('validation_ood_sets') or ()
    stray = set(validation) - set(self.cfg.ood_sets)
    if stray:
      raise ValueError(f'data.validation_ood_sets {sorted(stray)} are not in data.ood_sets: '
                       'add them there too')
    return {name: 'validation' if name in validation or name == self.heldout_validation_set
            else self.ood_group(name) for name in self.cfg.ood_sets}

  # --- Preparation.

  def _locations(self) -> list[Location]:
    return [self.locate(which) for which in dict.fromkeys((*ID_SPLITS, *self.cfg.ood_sets))]

  def check_prepared(self) -> None:
    """UserError naming the command that prepares a split or OOD set the config reads that
    is not generated and not in data_dir (they are never downloaded by a run). Reads only."""
    for location in self._locations():
      if not location.generated:
        self._check_prepared(location)

  def prepare(self) -> None:
    """Makes sure every split and OOD set the config reads is in data_dir: builds the generated
    ones that are absent (never touching existing ones) and checks the rest."""
    self.check_prepared()
    locations = self._locations()
    generated = {(location.dataset, location.config.name): location
                 for location in locations if location.generated}
    for location in generated.values():  # one build makes all of a dataset's splits
      location.build(self.data_dir)

  def _check_prepared(self, location: Location) -> None:
    """UserError unless `location`'s dataset is in data_dir, as ArrayRecord."""
    builder = location.builder(self.data_dir)
    if not builder.is_prepared():
      raise UserError(f'{location.name} is not prepared in {self.data_dir}: run '
                      f'{self.prepare_command(location, self.data_dir)}')
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise UserError(
          f'{location.name} in {builder.data_dir} is {builder.info.file_format.value}, which '
          f'grain cannot read: prepare it in another data dir with '
          f'{self.prepare_command(location, "DIR")}')
