"""florence_jax.devices: arrays back on the host and a compiled program's memory, read one way."""

import jax
import jax.numpy as jnp
import numpy as np

from florence_jax.devices import CompiledMemory, compiled_memory, to_host


def test_to_host_returns_the_values_as_numpy():
    x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    got = to_host(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(to_host([1, 2]), np.asarray([1, 2]))


def test_compiled_memory_reads_the_analysis_and_counts_a_donated_buffer_once():
    x = jax.ShapeDtypeStruct((256, 64), jnp.float32)
    nbytes = 256 * 64 * 4
    plain = compiled_memory(jax.jit(lambda a: a * 2.0).lower(x).compile())
    assert plain is not None and plain.argument == nbytes and plain.output == nbytes
    assert plain.total == plain.argument + plain.output + plain.temp - plain.alias
    memory = CompiledMemory(argument=100, output=60, temp=30, alias=40)
    assert memory.total == 150 and memory.beyond_inputs == 50
    assert CompiledMemory(argument=100, output=10, temp=30, alias=40).beyond_inputs == 30


def test_compiled_memory_is_none_without_an_analysis():
    class NoAnalysis:
        def memory_analysis(self):
            raise NotImplementedError

    class Empty:
        def memory_analysis(self):
            return None

    assert compiled_memory(NoAnalysis()) is None and compiled_memory(Empty()) is None
