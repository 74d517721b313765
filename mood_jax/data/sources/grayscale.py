"""Fashion-MNIST and MNIST as ID data (data.name: fashion_mnist, mnist): TFDS's own datasets,
prepared in data_dir by `python -m mood_jax.data.prepare`, with the embedded OOD sets made at
data.image_size in grayscale, and scikit-learn's digits (their test split) as a set of its own,
'digits': MNIST-like, as MNIST is the usual far-OOD set of Fashion-MNIST."""

from mood_jax.data.sources import embedded, tfds_dataset
from mood_jax.data.sources.location import Location

DIGITS_SET = embedded.NAME


class GrayscaleSource(tfds_dataset.TfdsSource):
  """28 px, one channel; images are resized to data.image_size only if it differs, and
  training translates them (as the digits) rather than crops: a random-resized crop of a
  centred 28 px garment or digit mostly cuts it."""

  NAMES = ('fashion_mnist', 'mnist')
  channels = 1
  fixed_size = True
  own_ood_sets = (DIGITS_SET, *embedded.FAR_OOD_SETS, *embedded.VALIDATION_OOD_SETS)

  def _own_ood_location(self, name: str) -> Location | None:
    if name == DIGITS_SET:
      return embedded.digits_location(self.cfg, 'test')
    return embedded.ood_location(name, self.cfg)

  def ood_group(self, name: str) -> str:
    return ('validation' if name in embedded.VALIDATION_OOD_SETS else
            super().ood_group(name))
