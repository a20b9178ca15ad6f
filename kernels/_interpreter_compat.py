"""Work-arounds for two defects of Triton 3.6's CPU interpreter (TRITON_INTERPRET=1), applied only
when the interpreter runs the kernels (the CI machines' logic tests):

* scalar kernel arguments are 1-element numpy arrays and `range(0, K, step)` calls int() on them,
  which numpy >= 2.4 refuses for arrays of one dimension;
* bfloat16 is stored as raw uint16 and tl.dot multiplies those raw integers.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def patch_interpreter() -> None:
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    patch_tensor = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patch_lang_tensor

    create_dot = interp.InterpreterBuilder.create_dot

    def _as_float32(handle):
        if handle.dtype == tl.bfloat16:
            return interp.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def _create_dot(self, a, b, d, *args):
        return create_dot(self, _as_float32(a), _as_float32(b), d, *args)

    interp.InterpreterBuilder.create_dot = _create_dot
