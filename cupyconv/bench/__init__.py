"""Benchmarks: ``python -m cupyconv.bench`` times every cupyconv op against
what a user would otherwise write, on the same inputs, in one run.

Peers
-----
GPU (when :func:`cupyconv.gpu_available`): PyTorch with cuDNN, TF32 off and,
for float32 convolutions, TF32 on (``cudnn.benchmark`` autotuning on in
both); and the plain-CuPy way: ``zeros`` plus a strided assignment for
dilate, a strided view copied for undilate, an im2col sliding-window view
plus ``cupy.matmul`` for conv2d (col2im by strided adds for the gradients),
reshape plus ``max`` for the 2x1 pool.

GPU precision modes (the "precision" group): every conv2d layer, forward
and forward+grads, and the batch sweep in float32 ``precision="highest"``,
``"tf32"`` and ``"3xtf32"`` and in float16 and bfloat16 (tensor cores),
each against cuDNN in the matching mode only (TF32 on for tf32, off for
highest and 3xtf32, the same dtype for float16 and bfloat16), with every
implementation's error against the same convolution in float64.

CPU: cupyconv's NumPy path against PyTorch CPU, the same plain-NumPy code as
above, and a naive loop (positions for dilate/undilate, windows for the pool,
kernel taps at stride 1 then subsampled for conv2d, as the seed project did).
PyTorch runs in both NCHW and channels_last memory formats (layout
conversion is not timed) and tables show the faster.

Training step
-------------
``train_step`` times one step of the demo's 5-day and 20-day CNNs
(forward, softmax cross-entropy, backward, Adam; batch 128) against the
same network in PyTorch (:mod:`cupyconv.bench.trainstep`), both training
their own copy from the same weights, a step per call.  The checked call
applies one dropout mask on both sides; its loss, logits and Linear weight
gradient are compared.  After the timed rounds the implementations
take turns in profiled steps that time every layer's forward and backward
(medians in the record's ``layers``; a table per case in the report).  On
the GPU each model's step is three cases, one per precision mode, each
against PyTorch in the same mode (:data:`cupyconv.bench.cases.TRAIN_MODES`):
float32 (TF32 off), TF32 (``cupyconv.default_precision("tf32")`` against
TF32 on) and float16 mixed precision (the model with
``compute_dtype=float16`` and a GradScaler against ``torch.autocast`` with
``torch.amp.GradScaler``; agreement within 2e-2 instead of 1e-2).

Timing method
-------------
* Inputs are made once per case (NHWC activations, HWIO weights, float32,
  normal random values) and converted to each library's layout outside the
  timed region.  Enough copies are cycled (2 to 4, together at least twice
  the last-level cache: GPU L2, CPU L3) that no call starts on inputs the
  previous call left in cache.
* Every implementation runs once untimed and its outputs are compared with
  the first implementation's (cupyconv's): the maximum relative difference
  is recorded (a nan counts as infinite), so a peer computing something
  else cannot go unnoticed.
* Every implementation of a case is prepared (its own copies of the
  inputs), checked and warmed up; then they take turns in
  :data:`~cupyconv.bench.timing.ROUNDS` rounds, each turn one untimed call
  and a share of the timed calls, so that a machine whose speed drifts
  during the run (other tenants of a virtual machine, clock changes) slows
  every implementation alike instead of whichever ran at the wrong moment.
* GPU: three warm-up calls (kernel compilation, cuDNN autotuning, memory-pool
  growth); then each timed call is bracketed by its own CUDA events (CuPy's
  or PyTorch's, on the stream the library uses) with no host
  synchronisation within a turn; the reported time is the median interval.
  There are enough calls to fill about 0.3 s (10 to 200) unless
  ``--repeats``.
* CPU: untimed calls for at least 0.2 s, then ``time.perf_counter`` around
  each timed call; the median of N calls, N sized to fill about 0.7 s (3 to
  25) unless ``--repeats``.  Peak memory is ``tracemalloc``'s peak over one
  further call (NumPy registers its buffers with tracemalloc; PyTorch's are
  invisible).
* References, measured in the same run: device-to-device copy bandwidth
  (1 GiB ``cudaMemcpy``; NumPy ``copyto`` of 64 MiB on the CPU), counted as
  read + write bytes, and the matmul rate on an 8192x8192 (CPU:
  2048x2048) square product: float32, and on the GPU also cuBLAS's TF32
  compute type, float16 and bfloat16 (a mode CuPy cannot multiply in gets
  no rate).  The precision cases compare with the rate of their mode.  Memory-bound ops report GB/s of compulsory
  traffic (each input element read once, each output element written once)
  as a share of the copy bandwidth; convolutions report FLOP/s
  (``2*N*Ho*Wo*C_out*kh*kw*C_in``, three times that with both gradients) as
  a share of the matmul rate.
* Machine state: the load average and a single-core probe (a fixed Python
  loop pinned to each core in turn) at the start and the end of the run.  A
  shared virtual machine may give one core less time than another; BLAS
  splits a product evenly across its threads and waits for the slowest,
  so the report warns when the probe times differ by more than 20%.
* ``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before PyTorch
  is imported: PyTorch's OpenMP workers otherwise spin between calls and,
  on a machine with few cores, starve the BLAS threads NumPy uses in the
  same process, so that calls wait for scheduler ticks.
* The ratio in every table is cupyconv's median time divided by the peer's
  best median: above 1 means cupyconv is slower, and the report lists every
  such case.
"""

from .run import SCHEMA, run

__all__ = ["SCHEMA", "run"]
