"""The official archive formats of the real datasets, read without TensorFlow.

Each reader yields TFDS examples `(key, record)` in the features of the TFDS builder of the
same dataset, with images as encoded bytes: TFDS writes bytes without TensorFlow, but encodes
numpy images with it (tfds image_feature._ENCODE_FN). Arrays (CIFAR, SVHN) are stored as PNG,
losslessly; JPEGs are stored as they are in the archive (`transforms.Decode` reads them as RGB,
CMYK included). A file that cannot be read raises UserError naming it.
"""

import contextlib
import gzip
import io
import json
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from xml.etree import ElementTree

import numpy as np
import PIL.Image

from mood_jax.errors import UserError

Example = tuple[str, dict]


@contextlib.contextmanager
def _reading(path: str, what: str):
  """Any error reading `path` becomes one line naming it: a truncated or corrupt download."""
  try:
    yield
  except (OSError, EOFError, tarfile.TarError, zlib.error, pickle.UnpicklingError, KeyError,
          ValueError, ElementTree.ParseError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f'{path} is not a readable {what} ({type(e).__name__}: {e}): '
                    'download it again') from None


def png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, format='PNG')
  return buffer.getvalue()


def tar_members(path: str, keep: Callable[[str], bool] = lambda name: True,
                what: str = 'tar archive') -> Iterator[tuple[str, bytes]]:
  """(name, bytes) of the regular files of a tar (any compression) that `keep`, in archive
  order; streamed, so a .tar.gz is read once, front to back."""
  with _reading(path, what), tarfile.open(path, 'r|*') as archive:
    for member in archive:
      if member.isfile() and keep(member.name):
        yield member.name, archive.extractfile(member).read()


def _tar_file(path: str, name: str, what: str) -> bytes:
  """One member of a tar, by its name."""
  for _, data in tar_members(path, lambda n: n == name, what):
    return data
  raise UserError(f'{path} has no {name}: it is not the official {what}; download it again')


def _check_all_found(images_tar: str, found: int, listed: int, split_list: str) -> None:
  """A tar cut short at a member's header, or with a damaged one, reads as a shorter tar
  (tarfile stops there without an error): the split's list tells."""
  if found < listed:
    raise UserError(f'{images_tar} lacks {listed - found} of the {listed} images that '
                    f'{split_list} lists: download it again')


def _listed_members(path: str, wanted, what: str, split_list: str) -> Iterator[tuple[str, bytes]]:
  """`tar_members` of the names in `wanted` (a set or dict of member names), and a UserError
  once the archive ends if any of them was not in it (`_check_all_found`)."""
  found = 0
  for name, data in tar_members(path, lambda n: n in wanted, what):
    found += 1
    yield name, data
  _check_all_found(path, found, len(wanted), split_list)


def _number(element: ElementTree.Element, path: str) -> float:
  text = element.findtext(path)
  if text is None:
    raise ValueError(f'no <{path}>')
  return float(text)


def _voc_boxes(xml: bytes) -> list[np.ndarray]:
  """The boxes of a PASCAL VOC annotation (Stanford Dogs', Oxford-IIIT Pet's), in document
  order, as TFDS's BBoxFeature wants them: [ymin, xmin, ymax, xmax] over the image's size."""
  root = ElementTree.fromstring(xml)
  height, width = _number(root, 'size/height'), _number(root, 'size/width')
  return [np.array([_number(box, 'ymin') / height, _number(box, 'xmin') / width,
                    _number(box, 'ymax') / height, _number(box, 'xmax') / width])
          for box in root.iter('bndbox')]


# --- CIFAR-10/100: the "python version" tarballs (pickled batches of [N, 3072] uint8). ---
# Features and ids as tensorflow_datasets/image_classification/cifar.py (it reads the binary one).

class _ArraysOnly(pickle.Unpickler):
  """CIFAR's batches hold numpy arrays, lists, bytes and numbers only: any other global is
  refused, so a tampered archive cannot run code as a plain `pickle.load` would let it."""

  _ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
              ('numpy._core.multiarray', '_reconstruct')}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'{module}.{name} is not part of a CIFAR batch')
    return super().find_class(module, name)


def cifar(path: str, batches: tuple[str, ...], label_keys: dict[str, str],
          key_prefix: str) -> Iterator[Example]:
  """label_keys: TFDS feature -> pickle key (CIFAR-10 'labels'; CIFAR-100 'fine_labels',
  'coarse_labels'). Keys and ids are TFDS's ('train_00042'), in batch order."""
  what = 'CIFAR python tarball'
  index = 0
  for batch in batches:
    raw = _tar_file(path, batch, what)
    with _reading(path, what):
      data = _ArraysOnly(io.BytesIO(raw), encoding='bytes').load()
      images = data[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
      labels = {feature: data[key.encode()] for feature, key in label_keys.items()}
    for i, pixels in enumerate(images):
      key = f'{key_prefix}{index:05d}'
      index += 1
      yield key, {'id': key, 'image': png(pixels),
                  **{feature: int(values[i]) for feature, values in labels.items()}}


# --- MNIST and Fashion-MNIST: IDX files (LeCun's format), gzip'd as published or not. ---
# As tensorflow_datasets/image_classification/mnist.py (_extract_mnist_images, _labels): the
# header is a magic number (0x0000 0x08 = unsigned bytes, then the number of dimensions) and
# each dimension's size, big-endian int32; then the bytes. TFDS skips the header unread; here
# it is checked, so that a wrong or cut file is named before anything is written.

_IDX_UINT8 = 0x08


def idx_array(path: str, ndim: int) -> np.ndarray:
  """An IDX file of unsigned bytes with `ndim` dimensions, its header checked against its
  length."""
  what = f'IDX file of {"images" if ndim == 3 else "labels"}'
  with _reading(path, what):
    with open(path, 'rb') as f:
      data = f.read()
    if data[:2] == b'\x1f\x8b':  # gzip's magic: as published
      data = gzip.decompress(data)
  header = 4 + 4 * ndim
  if len(data) < header or data[:4] != bytes((0, 0, _IDX_UINT8, ndim)):
    raise UserError(f'{path} is not an {what} (magic number {data[:4].hex() or "missing"}, '
                    f'expected {bytes((0, 0, _IDX_UINT8, ndim)).hex()}): download it again')
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  if len(data) - header != int(np.prod(shape)):
    raise UserError(f'{path} holds {len(data) - header} bytes after its header, which says '
                    f'{"x".join(map(str, shape))} = {int(np.prod(shape))}: it is cut short or '
                    'damaged; download it again')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def idx(images_path: str, labels_path: str, image_size: int,
        num_classes: int) -> Iterator[Example]:
  """TFDS mnist's examples (keys: the index, as TFDS's) from an images and a labels IDX file.
  Both are read and checked when called, before the first example is written."""
  images, labels = idx_array(images_path, 3), idx_array(labels_path, 1)
  if images.shape[1:] != (image_size, image_size):
    raise UserError(f'{images_path} holds {images.shape[1]}x{images.shape[2]} images, not '
                    f'{image_size}x{image_size}: it is not this dataset\'s file')
  if len(images) != len(labels):
    raise UserError(f'{images_path} holds {len(images)} images but {labels_path} '
                    f'{len(labels)} labels: they are not one split\'s pair; download them again')
  if len(labels) and labels.max() >= num_classes:
    raise UserError(f'{labels_path} has label {labels.max()}, beyond the {num_classes} '
                    'classes: it is not this dataset\'s file')
  return ((i, {'image': png(image), 'label': int(label)})
          for i, (image, label) in enumerate(zip(images, labels)))


# --- SVHN cropped digits: MATLAB files with X [32, 32, 3, N] and y [N, 1], digit 0 as 10. ---
# As tensorflow_datasets/datasets/svhn_cropped/svhn_cropped_dataset_builder.py.

def svhn(path: str, key_prefix: str) -> Iterator[Example]:
  import scipy.io  # a dependency of scikit-learn; only this reader needs it
  with _reading(path, 'SVHN .mat file'):
    mat = scipy.io.loadmat(path)
    images, labels = np.moveaxis(mat['X'], -1, 0), mat['y'].reshape(-1)
  for i, (pixels, label) in enumerate(zip(images, labels)):
    key = f'{key_prefix}{i:06d}'  # as TFDS's svhn_cropped
    yield key, {'id': key, 'image': png(pixels), 'label': int(label) % 10}


# --- ImageNet (ILSVRC2012): a train tar of per-class tars, a flat validation tar. ---
# As tensorflow_datasets/datasets/imagenet2012/{imagenet2012_dataset_builder,imagenet_common}.py.

def imagenet_train(path: str) -> Iterator[Example]:
  what = 'ILSVRC2012 train tar (a tar of per-class tars)'
  for class_tar, data in tar_members(path, lambda n: n.endswith('.tar'), what):
    wnid = class_tar.rsplit('/', 1)[-1][:-len('.tar')]
    with _reading(path, what), tarfile.open(fileobj=io.BytesIO(data)) as inner:
      for member in inner:
        if member.isfile():
          name = member.name.rsplit('/', 1)[-1]
          yield name, {'file_name': name, 'image': inner.extractfile(member).read(),
                       'label': wnid}


def imagenet_validation(path: str, wnids: list[str]) -> Iterator[Example]:
  """wnids: the class of ILSVRC2012_val_00000001.JPEG, ...02.JPEG, ... in order (TFDS ships it)."""
  what = 'ILSVRC2012 validation tar'
  for member, image in tar_members(path, lambda n: n.endswith('.JPEG'), what):
    name = member.rsplit('/', 1)[-1]
    try:
      wnid = wnids[int(name[len('ILSVRC2012_val_'):-len('.JPEG')]) - 1]
    except (ValueError, IndexError):
      raise UserError(f'{path}: {name} is not an ILSVRC2012 validation image name') from None
    yield name, {'file_name': name, 'image': image, 'label': wnid}


# --- DTD (Textures): dtd/images/<class>/<file>.jpg and dtd/labels/<split>.txt in one tarball. ---
# As tensorflow_datasets/image_classification/dtd.py.

def dtd(path: str, split_list: str) -> Iterator[Example]:
  """split_list: e.g. 'test1', TFDS's split of DTD's first train/val/test partition."""
  listed = _tar_file(path, f'dtd/labels/{split_list}.txt', 'DTD tarball').decode().split()
  wanted = {f'dtd/images/{name}': name for name in listed}
  for member, image in _listed_members(path, wanted, 'DTD tarball', f'{split_list}.txt'):
    name = wanted[member]
    yield name, {'file_name': name, 'image': image, 'label': name.split('/')[0]}


# --- Places365-Standard, small (256x256) images: a split tar and the file list's labels. ---
# As tensorflow_datasets/datasets/places365_small/places365_small_dataset_builder.py.

def places365(images_tar: str, filelist_tar: str, split: str) -> Iterator[Example]:
  """split: 'val' (TFDS 'validation'). Keys and file names as TFDS's places365_small."""
  lines = _tar_file(filelist_tar, f'places365_{split}.txt', 'Places365 file list tarball')
  labels = dict(line.split() for line in lines.decode().splitlines() if line.strip())
  found = 0
  for member, image in tar_members(images_tar, lambda n: n.endswith('.jpg'), 'Places365 tar'):
    name = member.rsplit('/', 1)[-1]
    if name not in labels:
      raise UserError(f'{images_tar}: {name} is not in {filelist_tar}: use the two archives '
                      'of the same Places365-Standard release')
    found += 1
    yield member, {'image': image, 'label': int(labels[name]), 'filename': member}
  _check_all_found(images_tar, found, len(labels), f'places365_{split}.txt')


# --- Food-101 (an ImageNet-30 OOD set): food-101/images/<class>/<id>.jpg, meta/<split>.json. ---
# As tensorflow_datasets/image_classification/food101.py (version 2.0.0: no 'id' feature).

def food101(path: str, split_json: str) -> Iterator[Example]:
  """split_json: 'train' or 'test' (TFDS 'validation'), the lists of food-101/meta/."""
  what = 'Food-101 tarball'
  with _reading(path, what):
    listed = json.loads(_tar_file(path, f'food-101/meta/{split_json}.json', what))
  wanted = {f'food-101/images/{name}.jpg': (name, label) for label, names in listed.items()
            for name in names}
  for member, image in _listed_members(path, wanted, what, f'{split_json}.json'):
    name, label = wanted[member]
    yield name, {'image': image, 'label': label}  # key 'apple_pie/1005649', as TFDS's


# --- Oxford Flowers 102 (an ImageNet-30 OOD set): jpg/image_NNNNN.jpg, labels and splits .mat. ---
# As tensorflow_datasets/datasets/oxford_flowers102/oxford_flowers102_dataset_builder.py.

def flowers102(images_tgz: str, labels_mat: str, setid_mat: str,
               split_key: str) -> Iterator[Example]:
  """split_key: setid.mat's 'trnid', 'valid' or 'tstid'; labels are 1-based there."""
  import scipy.io  # as `svhn`
  with _reading(labels_mat, 'imagelabels.mat'):
    labels = scipy.io.loadmat(labels_mat)['labels'].reshape(-1)
  with _reading(setid_mat, 'setid.mat'):
    ids = scipy.io.loadmat(setid_mat)[split_key].reshape(-1)
  wanted = {f'jpg/image_{i:05d}.jpg': int(labels[i - 1]) - 1 for i in ids}
  for member, image in _listed_members(images_tgz, wanted, '102flowers.tgz',
                                     f'setid.mat ({split_key})'):
    name = member.rsplit('/', 1)[-1]
    yield name, {'image': image, 'label': wanted[member], 'file_name': name}


# --- Stanford Dogs (an ImageNet-30 OOD set): images.tar's Images/<wnid-breed>/<id>.jpg, ---
# annotation.tar's Annotation/<wnid-breed>/<id> (VOC XML boxes), lists.tar's <split>_list.mat.
# As tensorflow_datasets/datasets/stanford_dogs/stanford_dogs_dataset_builder.py.

_DOG_BREEDS = 120


def _dogs_list(lists_tar: str, split: str) -> list[str]:
  """'n02085620-Chihuahua/n02085620_10074.jpg', ... of split 'train' or 'test'."""
  import scipy.io  # as `svhn`
  what = 'Stanford Dogs lists.tar'
  mat = _tar_file(lists_tar, f'{split}_list.mat', what)
  with _reading(lists_tar, what):
    return [str(p) for p in np.atleast_1d(
        scipy.io.loadmat(io.BytesIO(mat), squeeze_me=True)['file_list'])]


def stanford_dogs_breeds(lists_tar: str) -> list[str]:
  """The class names, which TFDS takes from the train list ('n02085620-chihuahua', sorted)."""
  breeds = sorted({os.path.dirname(p).lower() for p in _dogs_list(lists_tar, 'train')})
  if len(breeds) != _DOG_BREEDS:
    raise UserError(f'{lists_tar} lists {len(breeds)} breeds, not Stanford Dogs\' '
                    f'{_DOG_BREEDS}: it is not the official lists.tar; download it again')
  return breeds


def stanford_dogs(images_tar: str, annotation_tar: str, lists_tar: str,
                  split: str) -> Iterator[Example]:
  """split: 'train' or 'test'. Keys and file names are the images' paths in images.tar."""
  listed = {os.path.basename(p) for p in _dogs_list(lists_tar, split)}
  annotations = {name.rsplit('/', 1)[-1]: xml for name, xml in
                 tar_members(annotation_tar, what='Stanford Dogs annotation.tar')}
  found = 0
  for member, image in tar_members(images_tar, lambda n: os.path.basename(n) in listed,
                                   'Stanford Dogs images.tar'):
    breed, file_name = member.split('/')[-2:]
    stem = file_name.split('.')[0]
    if stem not in annotations:
      raise UserError(f'{annotation_tar} has no annotation of {member}: it is not the official '
                      'annotation.tar; download it again')
    with _reading(annotation_tar, f'Stanford Dogs annotation ({stem})'):
      boxes = _voc_boxes(annotations[stem])
    found += 1
    yield member, {'image': image, 'image/filename': member, 'label': breed.lower(),
                   'objects': [{'bbox': np.minimum(box, 1.0)} for box in boxes]}  # as TFDS
  _check_all_found(images_tar, found, len(listed), f'{split}_list.mat')


# --- Oxford-IIIT Pet (an ImageNet-30 OOD set): images.tar.gz's images/<name>.jpg, ---
# annotations.tar.gz's annotations/{trainval,test}.txt (name class species breed), trimaps/
# <name>.png and xmls/<name>.xml (the head's box; trainval images only). TFDS notes that both
# are plain tars despite their name; `tar_members` reads either.
# As tensorflow_datasets/datasets/oxford_iiit_pet/oxford_iiit_pet_dataset_builder.py.

def _clean_jpeg(image: bytes) -> bytes:
  """TFDS re-encodes the few pet images that are not clean JPEGs (a PNG, an alpha channel) with
  TensorFlow: decoded, alpha dropped, JPEG at quality 95. Here PIL does the same, so pixels
  match TFDS's up to the two JPEG encoders, not byte for byte."""
  buffer = io.BytesIO()
  with PIL.Image.open(io.BytesIO(image)) as decoded:
    decoded.convert('RGB').save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def _pet_head(xml: bytes | None) -> np.ndarray:
  if xml is None:  # test images have none: TFDS stores an empty box
    return np.zeros(4)
  boxes = _voc_boxes(xml)
  if not boxes:
    raise ValueError('no <bndbox>')
  return boxes[0]  # the first object's, as TFDS


def oxford_iiit_pet(images_tar: str, annotations_tar: str, list_name: str,
                    reencode: frozenset[str]) -> Iterator[Example]:
  """list_name: 'trainval' (TFDS 'train') or 'test'; reencode: TFDS's names of the images that
  it re-encodes. The trimap PNG is stored as it is (TFDS stores the file's bytes too)."""
  what = 'Oxford-IIIT Pet annotations.tar.gz'
  annotations = dict(tar_members(annotations_tar, lambda n: n.endswith(('.txt', '.png', '.xml')),
                                 what))
  if f'annotations/{list_name}.txt' not in annotations:
    raise UserError(f'{annotations_tar} has no annotations/{list_name}.txt: it is not the '
                    f'official {what}; download it again')
  listed = {}
  with _reading(annotations_tar, f'{what} ({list_name}.txt)'):
    for line in annotations[f'annotations/{list_name}.txt'].decode().splitlines():
      if line.strip():
        name, label, species, _ = line.split()
        listed[f'images/{name}.jpg'] = name, int(label) - 1, int(species) - 1  # 1-based there
  for member, image in _listed_members(images_tar, listed, 'Oxford-IIIT Pet images.tar.gz',
                                     f'{list_name}.txt'):
    name, label, species = listed[member]
    trimap = annotations.get(f'annotations/trimaps/{name}.png')
    if trimap is None:
      raise UserError(f'{annotations_tar} has no annotations/trimaps/{name}.png: it is not the '
                      f'official {what}; download it again')
    with _reading(annotations_tar, f'{what} (xmls/{name}.xml)'):
      head_box = _pet_head(annotations.get(f'annotations/xmls/{name}.xml'))
    if name in reencode:
      with _reading(images_tar, f'Oxford-IIIT Pet image ({member})'):
        image = _clean_jpeg(image)
    yield f'{name}.jpg', {'image': image, 'label': label, 'species': species,
                          'file_name': f'{name}.jpg', 'segmentation_mask': trimap,
                          'head_bbox': head_box}
