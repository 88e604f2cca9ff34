"""Measured defaults of the methods, in one place: each with the result that chose it.

All speeds are ratios against torch SDPA timed in the same run on the project's 2-core CPU VM (B=1, H=8, D=64, fp32);
errors are relative Frobenius errors of one layer's attention output on real SmolLM2-135M q/k/v. Change a value here
only with a new measurement, and link it.
"""

# hyper / sparse_hyper ------------------------------------------------------------------------------------------
# Exact attention below this length; the leaf size of the causal recursion. Chosen where both methods first beat SDPA
# bidirectionally (2048). The current run of eval/results/kernels_cpu/results.md (scripts/bench_cpu_kernels.py, two
# threads) has them faster already at 1024 (1.16x / 1.29x): a lower value is not yet re-derived on the model.
MIN_SEQ_LEN = 2048

# Causal calls run exact below causal_min_seq_len; its default 0 means CAUSAL_CROSSOVER_FACTOR x min_seq_len. Both causal
# modes cross SDPA between 2048 and 4096 tokens on one thread (recursive 0.73-0.88x at 2048, 1.14-1.22x at 4096):
# eval/results/kernels_causal/results.md (scripts/bench_causal_kernels.py).
CAUSAL_CROSSOVER_FACTOR = 2
CAUSAL_MIN_SEQ_LEN = 0

# Attention sinks: every query also attends the first keys exactly. 64 gave the lowest mean per-layer error of 0/4/16/64
# for both methods (hyper 0.390 -> 0.120, sparse_hyper 0.494 -> 0.178; lower in 30 of 30 layers) on a 4096-token
# article: eval/results/smollm2_layer_error/results.md (scripts/smollm2_layer_error.py).
NUM_SINK_TOKENS = 64

# Causal algorithm. "recursive" (HyperAttention's halving) keeps the lowest error at its speed at 8k (sparse_hyper
# 2.04x at 0.171, hyper 1.71x at 0.144); the single pass is faster (2.4-3.7x) at about twice the error, and `local`
# beats it at equal speed: eval/results/kernels_causal/results.md.
CAUSAL_MODES = ("recursive", "single_pass")
CAUSAL_MODE = "recursive"

# Exact local window of the single pass: at block 256, window 256 -> 512 lowered the 8k real-layer error from 0.335
# (3.16x) to 0.250 (2.42x): eval/results/kernels_causal/results.md.
SINGLE_PASS_WINDOW = 512

# Causal quadrants of the recursion cut each key block's queries into chunks of block_size / 2: at 32k, chunks of
# block_size were 57-65% full, block_size / 4 were 85% full but gathered every key block ~4.6 times (a profile of
# the recursion when it was written; no result file was kept).
CAUSAL_QUERY_CHUNK_DIVISOR = 2

# local ---------------------------------------------------------------------------------------------------------
# Window 128 / 256 / 512 / 1024 / 2048 ran 15.9x / 11.5x / 7.1x / 3.4x / 1.5x at 8k causal, at real-layer error
# 0.51 / 0.41 / 0.29 / 0.18 / 0.08; 1024 is the fastest whose error matches sparse_hyper's recursion (0.171), and it
# runs 11.3x at 32k: eval/results/kernels_causal/results.md. Sinks: NUM_SINK_TOKENS (not re-swept for local).
LOCAL_WINDOW = 1024
LOCAL_NUM_SINK_TOKENS = NUM_SINK_TOKENS
# Window 1024 ran 0.79x at 2048 tokens and 1.53x at 4096: eval/results/kernels_causal/results.md.
LOCAL_MIN_SEQ_LEN = 4096
