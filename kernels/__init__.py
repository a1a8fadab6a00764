"""Hot-path kernels of the engine.

Each module holds a plain-PyTorch reference (``*_reference``), a Triton implementation
(``*_triton``) and a dispatcher (the bare name) that picks Triton for CUDA tensors and the
reference otherwise. The references define the semantics; tests compare the two. The Triton path
goes through opaque operators, ``torch.ops.npgmf.*`` (:mod:`kernels.ops`), so ``torch.compile``
and ``torch.export`` see each kernel as one node.
"""

from kernels.blur import gaussian_blur, normalize_merge_blur
from kernels.cosine_maps import cosine_maps
from kernels.knn import knn_min
from kernels.vq import vq_nearest

__all__ = ["cosine_maps", "gaussian_blur", "knn_min", "normalize_merge_blur", "vq_nearest"]
