"""The CUDA boundary: device memory, copies and streams, through cuda-python or pycuda, whichever is installed.

cuda-python 12.6+ and 13 expose the runtime API as `cuda.bindings.runtime` (13 removed the old `from cuda import
cudart`); older JetPack images carry pycuda instead. Nothing else in yoloslim touches CUDA.
"""

from __future__ import annotations

import numpy as np

from yoloslim.utils.errors import YoloslimError


class CudaPython:
    """cuda-python's runtime API."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python before 12.6
        self.rt = cudart

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise YoloslimError(f"CUDA error {err}; check the driver with `yoloslim doctor`")
        return rest[0] if len(rest) == 1 else rest

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

    def __init__(self):
        try:
            import pycuda.autoinit  # noqa: F401  (creates the context)
        except ImportError:
            raise
        except Exception as error:  # pycuda's own errors: no GPU, no driver, a driver too old
            raise YoloslimError(
                f"pycuda cannot start CUDA ({error}); check the GPU and driver with `yoloslim doctor`"
            ) from None
        import pycuda.driver as cuda

        self.cuda = cuda
        self._allocations, self._streams = {}, {}

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


def load_cuda():
    """cuda-python if installed, else pycuda; a clear error when neither is."""
    for api in (CudaPython, PyCuda):
        try:
            return api()
        except ImportError:
            continue
    raise YoloslimError(
        "neither cuda-python nor pycuda is installed; pip install cuda-python (or use JetPack's pycuda)"
    )
