"""The CUDA boundary: page-locked host memory, device memory, copies and streams, through cuda-python or pycuda,
whichever works here. Nothing else in yoloslim touches CUDA.

cuda-python 12.6+ and 13 expose the runtime API as `cuda.bindings.runtime` (13 removed the old `from cuda import
cudart`); older JetPack images carry pycuda instead. A cuda-python built for a newer CUDA than the device's driver
imports fine and fails on its first call (cudaErrorInsufficientDriver: cuda-python 13 needs driver 580 or later,
which no JetPack 5 or 6 has), so a binding counts as usable only once a call has succeeded.
"""

from __future__ import annotations

import ctypes
from typing import List, Tuple

import numpy as np

from yoloslim.utils.errors import YoloslimError

FIRST_CUDA_PYTHON = (11, 5)  # the oldest cuda-python release on PyPI


def cuda_python_requirement(cuda_version: str) -> str:
    """The cuda-python releases for a device with this CUDA toolkit ('12.6' from nvcc): its major, no newer minor.
    cuda-python shares CUDA's major.minor; a newer major needs a newer driver, and a newer minor of the same major
    leans on CUDA's minor-version compatibility, which yoloslim has not seen work on a Jetson. CUDA older than the
    first cuda-python release (JetPack 5's 11.4) has none: pycuda it is."""
    major, minor = (int(part) for part in cuda_version.split(".")[:2])
    if (major, minor) < FIRST_CUDA_PYTHON:
        first = ".".join(map(str, FIRST_CUDA_PYTHON))
        return f"none for CUDA {major}.{minor} (the first is for {first}); pip install pycuda"
    return f"cuda-python>={major}.0,<{major}.{minor + 1}"


def _installed(distributions: Tuple[str, ...]) -> str:
    """'cuda-bindings 13.5.0': the first of a binding's distributions that is installed, with its version."""
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return f"{distributions[0]} (version unknown)"


class CudaPython:
    """cuda-python's runtime API."""

    distribution = "cuda-python"
    # cuda-python 12.6 and later is a metapackage over cuda-bindings, which torch's CUDA wheels install alone
    distributions = ("cuda-python", "cuda-bindings")

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python before 12.6
        self.rt = cudart
        if self.device_count() < 1:
            raise YoloslimError("CUDA sees no GPU")

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = getattr(err, "name", err)  # cudaErrorInsufficientDriver: str() of an IntEnum is its number
            raise YoloslimError(f"CUDA error {name}")
        return rest[0] if len(rest) == 1 else rest

    def device_count(self) -> int:
        return int(self._check(self.rt.cudaGetDeviceCount()))

    def host_empty(self, shape: Tuple[int, ...], dtype) -> np.ndarray:
        """A page-locked array (cudaMallocHost): cudaMemcpyAsync from pageable memory is staged and synchronous."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = int(self._check(self.rt.cudaMallocHost(nbytes)))
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)

    def free_host(self, array: np.ndarray) -> None:
        self._check(self.rt.cudaFreeHost(array.ctypes.data))

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr))

    def stream(self) -> int:
        return int(self._check(self.rt.cudaStreamCreate()))

    def destroy_stream(self, stream: int) -> None:
        self._check(self.rt.cudaStreamDestroy(stream))

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))

    def synchronize(self, stream: int) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def device(self) -> dict:
        props = self._check(self.rt.cudaGetDeviceProperties(0))
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name, "compute_capability": f"{props.major}.{props.minor}"}


class PyCuda:
    """pycuda's driver API (it keeps the allocation objects alive, so they are held here)."""

    distribution = "pycuda"
    distributions = ("pycuda",)

    def __init__(self):
        try:
            import pycuda.autoinit  # noqa: F401  (creates the context: the first call into the driver)
        except ImportError:
            raise
        except Exception as error:  # pycuda's own errors: no GPU, no driver, a driver too old
            raise YoloslimError(f"pycuda cannot start CUDA ({error})") from None
        import pycuda.driver as cuda

        self.cuda = cuda
        self._allocations, self._streams = {}, {}

    def host_empty(self, shape: Tuple[int, ...], dtype) -> np.ndarray:
        """A page-locked array: cudaMemcpyAsync from pageable memory is staged and synchronous."""
        return self.cuda.pagelocked_empty(shape, dtype)

    def free_host(self, array: np.ndarray) -> None:
        array.base.free()  # the HostAllocation behind pagelocked_empty

    def malloc(self, nbytes: int) -> int:
        allocation = self.cuda.mem_alloc(nbytes)
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def stream(self) -> int:
        stream = self.cuda.Stream()
        self._streams[stream.handle] = stream
        return stream.handle

    def destroy_stream(self, stream: int) -> None:
        self._streams.pop(stream)  # pycuda destroys a stream when its object goes

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        self.cuda.memcpy_htod_async(ptr, host, self._streams[stream])

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        self.cuda.memcpy_dtoh_async(host, ptr, self._streams[stream])

    def synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def device(self) -> dict:
        dev = self.cuda.Context.get_device()
        major, minor = dev.compute_capability()
        return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}


BINDINGS = (CudaPython, PyCuda)


class NoCudaBinding(YoloslimError):
    """No CUDA binding imports and answers a call; `failures` says why, one entry per binding."""

    def __init__(self, failures: List[str]):
        self.failures = failures
        super().__init__(
            f"no usable CUDA binding ({'; '.join(failures)}); check the GPU and driver, and install the cuda-python "
            "that `yoloslim doctor` names for this CUDA, or pycuda"
        )


def load_cuda():
    """The first binding that imports and answers a call: cuda-python, else pycuda; else NoCudaBinding naming why
    each failed."""
    failures = []
    for api in BINDINGS:
        try:
            return api()
        except ImportError:
            failures.append(f"{api.distribution} is not installed")
        except Exception as error:  # any failure of a first call: fall back to the next binding
            failures.append(f"{_installed(api.distributions)} fails: {error}")
    raise NoCudaBinding(failures)


def describe(binding) -> str:
    """'cuda-python 12.6.2' or 'pycuda 2024.1', for reports."""
    return _installed(binding.distributions)
