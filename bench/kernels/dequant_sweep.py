"""Tile sweep of the decode-for-cuBLAS kernel on the gate/up shape (avg4), CUDA graphs over copies."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_time  # noqa: E402
from qvla_ros.kernels import launch_dequant  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

n, k = 11008, 4096
kws = [random_kernel_weights(n, k, mix_counts(n, MIXES["avg4"]), "cuda", seed=s) for s in range(8)]
for rows, feats, warps in ((32, 512, 4), (16, 512, 4), (64, 512, 4), (32, 1024, 8), (16, 2048, 4), (64, 512, 8),
                           (16, 512, 2), (32, 2048, 8)):
    try:
        t = graph_time([(lambda kw=kw: launch_dequant(kw, block_rows=rows, block_features=feats, num_warps=warps))
                        for kw in kws])
        print(f"rows {rows} features {feats} warps {warps}: {t * 1e6:.1f} us", flush=True)
    except Exception as e:
        print(f"rows {rows} features {feats} warps {warps}: failed {e!r}"[:300], flush=True)
