import sys

from florence_jax.host_memory import retain_freed_memory

retain_freed_memory()  # on the CPU only, before JAX starts (see florence_jax.host_memory)

from florence_jax.label.cli import main  # noqa: E402

sys.exit(main())
