"""Model FLOPs utilisation: the compiled step's FLOPs over step time and the chip's peak.

MaxText's way: the FLOPs are XLA's cost analysis of the AOT-compiled train step
(``compiled.cost_analysis()['flops']``), which for an SPMD program counts the FLOPs of
*one device's* partitioned program (checked: a 4B-width step on 8 fake devices reports 1/8
of the model's 6*N*T estimate), so

    MFU = step_flops_per_device / (step_seconds * peak_flops_per_device)

with the dense bf16 peak of the device (:data:`PEAK_BF16_FLOPS`, vendor datasheets, no
sparsity).  The same bf16 peak is used whatever the step's dtype (MaxText's convention), so
an f32 step reports a low MFU by design.  Unknown devices (CPU included) have no peak: the
loop logs throughput only.
"""

from __future__ import annotations

import re
from typing import Optional

# (pattern over the lower-cased jax device_kind, dense bf16 FLOP/s per chip / GPU).  First
# match wins, so the more specific patterns come first.  device_kind examples: 'TPU v4',
# 'TPU v5 lite' (v5e), 'TPU v5' / 'TPU v5p', 'TPU v6 lite' (v6e), 'NVIDIA A100-SXM4-80GB',
# 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H200'.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"tpu v6( lite|e)", 918e12),          # Trillium
    (r"tpu v5( lite|e|litepod)", 197e12),   # v5e
    (r"tpu v5p?$", 459e12),                # v5p (device_kind "TPU v5")
    (r"tpu v4", 275e12),
    (r"h200", 989e12),                     # H200 SXM (same tensor cores as H100 SXM)
    (r"h100.*pcie", 756e12),
    (r"h100.*nvl", 835e12),
    (r"h100", 989e12),                     # H100 SXM5
    (r"a100", 312e12),                     # SXM4 and PCIe
)


def peak_flops(device_kind: Optional[str]) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one device of this ``device_kind``; None if unknown."""
  if not device_kind:
    return None
  kind = device_kind.strip().lower()
  for pattern, peak in PEAK_BF16_FLOPS:
    if re.search(pattern, kind):
      return peak
  return None


def device_peak_flops(device=None) -> Optional[float]:
  """:func:`peak_flops` of ``device`` (default: ``jax.devices()[0]``)."""
  if device is None:
    import jax  # pylint: disable=g-import-not-at-top
    device = jax.devices()[0]
  return peak_flops(getattr(device, "device_kind", None))


def mfu(step_flops_per_device: Optional[float], step_seconds: float,
        peak_flops_per_device: Optional[float]) -> Optional[float]:
  """``flops / (seconds * peak)``, or None when the FLOPs or the peak are unknown."""
  if not step_flops_per_device or not peak_flops_per_device or step_seconds <= 0:
    return None
  return float(step_flops_per_device) / (float(step_seconds) * float(peak_flops_per_device))
