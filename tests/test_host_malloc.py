"""Finding the preloaded malloc that the CPU training hint and the benchmark report."""

from mood_jax.run import allocator

LIBC = '7f2a1c000000-7f2a1c028000 r--p 00000000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6\n'


def _maps(tmp_path, text: str) -> str:
  path = tmp_path / 'maps'
  path.write_text(text)
  return str(path)


def test_the_c_library_malloc_is_none(tmp_path):
  anonymous = '7f2a1d000000-7f2a1d001000 rw-p 00000000 00:00 0\n'
  assert allocator.caching_malloc(_maps(tmp_path, LIBC + anonymous)) is None


def test_a_preloaded_tcmalloc_or_jemalloc_is_named(tmp_path):
  tcmalloc = '7f2a1e000000-7f2a1e010000 r-xp 00000000 fe:01 99 /usr/lib/libtcmalloc_minimal.so.4\n'
  assert allocator.caching_malloc(_maps(tmp_path, tcmalloc + LIBC)) == 'libtcmalloc_minimal.so.4'
  jemalloc = '7f2a1e000000-7f2a1e010000 r-xp 00000000 fe:01 99 /opt/lib/libjemalloc.so.2\n'
  assert allocator.caching_malloc(_maps(tmp_path, LIBC + jemalloc)) == 'libjemalloc.so.2'


def test_no_maps_file_is_none(tmp_path):
  assert allocator.caching_malloc(str(tmp_path / 'absent')) is None
