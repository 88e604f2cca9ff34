"""Measured defaults of the methods, in one place: each with the result that chose it.

All speeds are ratios against torch SDPA timed in the same run on one thread of the project's 2-core CPU VM (B=1, H=8,
D=64, fp32, causal unless said); errors are mean relative Frobenius errors of one layer's attention output on real
SmolLM2-135M q/k/v (8192 tokens, layers 3/10/20/28 unless said). Change a value here only with a new measurement, and
link it (tests/test_defaults.py checks that every value names a result file that exists).
"""

# hyper / sparse_hyper ------------------------------------------------------------------------------------------
# Exact attention below this length; the leaf size of the causal recursion. 2048 is on the speed-error Pareto front of
# both methods at 8k (hyper 1.70x at 0.144, sparse_hyper 1.96x at 0.171); 1024 gains at most 11% speed (1.76x / 2.18x)
# for +20% / +42% error (0.173 / 0.243), 4096 lowers the error (0.108 / 0.104) for 16-25% less speed (1.43x / 1.47x
# at 8k, 3.8x / 4.1x at 32k): eval/results/defaults_min_seq_len/results.md. It is also the bidirectional threshold,
# where both already beat SDPA at 1024 (hyper 1.06-1.19x, sparse_hyper 1.57-1.64x): eval/results/kernels_full/results.md.
MIN_SEQ_LEN = 2048

# Causal calls run exact below causal_min_seq_len; its default 0 means CAUSAL_CROSSOVER_FACTOR x min_seq_len = 4096.
# At min_seq_len 2048 both recursions first beat SDPA at 3072 by a margin inside the run-to-run noise (hyper 1.06x,
# sparse_hyper 1.10x; sparse_hyper 1.09x at 2048 here, 0.82x in kernels_causal) and by 1.14x / 1.21x at 4096:
# eval/results/defaults_causal_threshold/results.md (kernels_causal: 1.14x / 1.22x at 4096). The same factor at
# min_seq_len 1024 would start at 2048, where that leaf is slower than SDPA (0.84x / 0.93x).
CAUSAL_CROSSOVER_FACTOR = 2
CAUSAL_MIN_SEQ_LEN = 0

# Queries per sorted block (both methods, every mode). Recursion, block 64 / 128 / 256: hyper 1.93x / 1.91x / 1.78x at
# 8k, 4.2x / 4.3x / 3.8x at 32k, error 0.154 / 0.151 / 0.144; sparse_hyper 2.25x / 2.11x / 2.02x, 5.9x / 6.0x / 5.0x,
# error 0.193 / 0.184 / 0.171 (eval/results/defaults_block_size/results.md). Every size is on the Pareto front: 128
# trades 5-8% more error for 4-7% speed at 8k and 11-19% at 32k, a trade for the model-level perplexity to decide, so
# 256 stays. Single pass: 128 vs 256 at window 256, sparse_hyper 3.72x at 0.353 vs 3.16x at 0.335:
# eval/results/kernels_causal/results.md.
BLOCK_SIZE = 256

# hyper's uniform samples per query (recursion, bidirectional and single pass): HyperAttention's 256. In the single pass
# (window 256, block 128) 64 samples raise the real-layer error over none (0.411 vs 0.363: too few samples, too much
# variance), 128 only match it (0.356) and 256 lower it (0.279), each at a cost (3.33x / 2.58x / 2.38x / 1.81x at 8k):
# eval/results/defaults_sample_size/results.md. 256 is the only count that buys accuracy, so it stays.
SAMPLE_SIZE = 256

# Attention sinks: every query also attends the first keys exactly. 64 gave the lowest mean per-layer error of 0/4/16/64
# for both methods (hyper 0.390 -> 0.120, sparse_hyper 0.494 -> 0.178; lower in 30 of 30 layers) on a 4096-token
# article: eval/results/smollm2_layer_error/results.md (scripts/smollm2_layer_error.py). At 8k in sparse_hyper's single
# pass (window 512, block 256), 0 / 16 / 64 / 128 sinks: error 0.631 / 0.272 / 0.250 / 0.240 at 2.01x / 1.61x / 1.56x /
# 1.51x (speed within noise from 16 on): 128 buys 0.010 for 64 more keys per query, where 64 more window positions
# buy about 0.02 (window 256 -> 512: 0.335 -> 0.250, kernels_causal), so 64 stays: eval/results/defaults_sinks/results.md.
NUM_SINK_TOKENS = 64

# Causal algorithm. "recursive" (HyperAttention's halving) keeps the lowest error at its speed at 8k (sparse_hyper
# 2.04x at 0.171, hyper 1.71x at 0.144); the single pass is faster (2.4-3.7x) at about twice the error, and `local`
# beats it at equal speed: eval/results/kernels_causal/results.md.
CAUSAL_MODES = ("recursive", "single_pass")
CAUSAL_MODE = "recursive"

# Exact local window of the single pass: at block 256, window 256 -> 512 lowered the 8k real-layer error from 0.335
# (3.16x) to 0.250 (2.42x): eval/results/kernels_causal/results.md.
SINGLE_PASS_WINDOW = 512

# Causal quadrants of the recursion cut each key block's queries into chunks of block_size / 2. Divisor 1 / 2 / 4 at
# 8k and 32k (both methods at their defaults): chunks 58-62% / 74-76% / 85-87% full, each key block gathered 1.6-1.7
# / 2.6-2.7 / 4.6-4.7 times, speed 0.93-0.95x / 1 / 0.98-1.02x (within the repeats' spread); outputs bit-equal:
# eval/results/defaults_query_chunk/results.md. 1 is slower by more than the noise, 4 is not faster, so 2 stays.
CAUSAL_QUERY_CHUNK_DIVISOR = 2

# local ---------------------------------------------------------------------------------------------------------
# Window 128 / 256 / 512 / 1024 / 2048 ran 15.9x / 11.5x / 7.1x / 3.4x / 1.5x at 8k causal, at real-layer error
# 0.51 / 0.41 / 0.29 / 0.18 / 0.08; 1024 is the fastest whose error matches sparse_hyper's recursion (0.171), and it
# runs 11.3x at 32k: eval/results/kernels_causal/results.md.
LOCAL_WINDOW = 1024

# Sinks of local (window 1024) at 8k, 0 / 16 / 64 / 128: error 0.617 / 0.195 / 0.178 / 0.170 at 2.89x / 2.78x / 2.56x /
# 2.64x (speed within noise from 16 on; layers 20 and 28 need sinks: 1.07 / 0.87 without). 64 stays, as for the
# sorted-LSH methods (128 buys 0.008, what 64 more window positions buy between 1024 and 2048):
# eval/results/defaults_sinks/results.md.
LOCAL_NUM_SINK_TOKENS = NUM_SINK_TOKENS

# Window 1024 ran 0.83x / 1.14x / 1.55x at 2048 / 3072 / 4096 tokens (kernels_causal: 0.79x at 2048, 1.53x at 4096):
# 4096 is the first length where it pays by more than the run-to-run noise:
# eval/results/defaults_causal_threshold/results.md.
LOCAL_MIN_SEQ_LEN = 4096

# block_select ----------------------------------------------------------------------------------------------------
# Sinks + window + selected keys (block_select.py), the key budget of local w1024 per row: 64 sinks + window 512 + 512
# selected keys, chosen by the vertical estimate of the last 64 rows (MInference's "last q" of 64). Single key columns
# (block_size 1) against 8 blocks of 64 and MoBA's 8 blocks of 64 per 256-query block, in one run with local w1024:
# real-layer error 0.106 / 0.265 / 0.192 (local w1024 0.178) at 2.48x / 2.36x / 1.90x SDPA at 8k (local 2.48x) and
# 9.35x / 8.62x / 7.11x at 32k (local 9.76x): eval/results/kernels_block_select/results.md. Columns are the only
# selection on the error-speed Pareto front next to local; the pass key at 8k is kept by all three (3/3 each, local
# 0/3): docs/methods/block_select.md.
BLOCK_SELECT_SELECTIONS = ("vertical", "moba")
BLOCK_SELECT_SELECTION = "vertical"
BLOCK_SELECT_WINDOW = 512
BLOCK_SELECT_NUM_SINK_TOKENS = NUM_SINK_TOKENS
BLOCK_SELECT_NUM_SELECTED = 512
BLOCK_SELECT_BLOCK_SIZE = 1
BLOCK_SELECT_PROBE_QUERIES = 64
BLOCK_SELECT_QUERY_BLOCK = 256
# Not measured for block_select itself: local's crossover (its window runs local's code, and it runs at local w1024's
# speed at 8k, eval/results/kernels_block_select/results.md): eval/results/defaults_causal_threshold/results.md.
BLOCK_SELECT_MIN_SEQ_LEN = LOCAL_MIN_SEQ_LEN
# The window of the layers of largest Q/K weight norm R in recommend.WINDOW_BY_R_RECOMMENDATION: block_select on
# all 30 layers of SmolLM2 at 8k, same 10 articles, window 512 everywhere +6.3% perplexity at 1.77x prefill, 1024
# everywhere +2.6% at 1.52x, 1024 on the half of largest R and 512 on the rest +3.6% at 1.59x, each in its own run
# (eval/results/model_bench_hybrid_windows/results.md; timed article by article in turn with the exact model: 512
# everywhere 1.50x, the half of largest R 1.41x, eval/results/model_bench_frontier_paired/results.md); local w512
# instead of block_select on the low-R half: +4.8% at 1.72x (eval/results/model_bench_hybrid/results.md). The half of largest R is where the needle mass of a pass-key
# probe sits (eval/results/retrieval_layers_smollm2/results.md). Not the default: at 8k it kept 6 of the unpatched
# model's 9 niah_multikey_1 answers, window 512 everywhere 8 (eval/results/ruler_recommended_8k/frontier.md).
BLOCK_SELECT_WIDE_WINDOW = 1024
BLOCK_SELECT_WIDE_LAYERS = 0.5
# The prefill of recommend.CAUSAL_RECOMMENDATION (the method's own defaults above stay the kernel's): local w1024's
# window and sinks plus 64 selected key columns (1152 keys per row). SmolLM2 at 8k, 10 articles, one thread, each
# paired with the exact model, the two plans timed at the same time on the two cores: 1.45x [1.42, 1.47] against window
# 512 + 512 columns' 1.43x [1.40, 1.46] (eval/results/model_bench_speed_w1024_s64_beside_w512/results.md,
# eval/results/model_bench_speed_w512_beside_w1024_s64/results.md), perplexity +3.1% against +6.3%; RULER at 8k: pass
# key 45 (9 of 9 kept) as window 512, niah_single_1/2 90 / 50 against 90 / 55 (10 of 11 kept each),
# niah_multikey_1 over two draws 21 of the unpatched model's 25 answers kept against 20
# (eval/results/ruler_recommended_8k/frontier.md, eval/results/ruler_niah_8k/frontier.md,
# eval/results/ruler_multikey_8k_seed1/frontier.md).
RECOMMENDED_BLOCK_SELECT_WINDOW = 1024
RECOMMENDED_BLOCK_SELECT_NUM_SELECTED = 64
# Decode steps of the recommended plans: exact on some layers, sinks + window (local, its defaults) on the others, every
# layer keeping block_select's prefill. SmolLM2 at 8k (8000-token prompts, one thread, against the unpatched model's
# DynamicCache; RULER: 22 pass keys at depths 0-100% and 22 niah_multikey_1 samples at 8k):
# - recommend.CAUSAL_RECOMMENDATION: exact on the two thirds of largest Q/K weight norm R (20 of 30), local on the rest:
#   1.53x [1.46, 1.61] per token (eval/results/decode_split_smollm2/results.md), keeping every pass key (9 of 9) and
#   niah_multikey_1 answer (8 of 9) that exact decode keeps (eval/results/ruler_recommended_8k/frontier.md); exact on
#   the 10 of largest R is faster (1.87x in that run) but dropped a digit of 1 of 4 pass keys
#   (eval/results/ruler_frontier_smollm2/frontier.md).
# - recommend.RETRIEVAL_DECODE_RECOMMENDATION: local on the two thirds of least needle mass on a pass-key probe
#   (select="retrieval"), exact on the third of most: 1.54x [1.44, 1.67] per token against exact decode everywhere's
#   1.17x in the same run (eval/results/decode_split_retrieval_smollm2/results.md), the same facts kept
#   (ruler_recommended_8k).
# Local decode on every layer keeps 1 of the 4 pass keys exact decode keeps (ruler_frontier_smollm2).
DECODE_EXACT_LAYERS_BY_R = 2 / 3
DECODE_LOCAL_LAYERS_BY_RETRIEVAL = 2 / 3

# quest (decode over the KV cache) ---------------------------------------------------------------------------------
# Pages of 32 tokens: the index (per-page key min / max) costs 1/32 of the cache (3.1%; Quest's 16 costs 6.3%), and
# page 16 kept fewer facts at the same budget (pass keys at 8k 3 of the unpatched 4 against 4, niah_single_1 at 4k 6 of
# 10 against 7): eval/results/ruler_frontier_smollm2/frontier.md. A budget of 1024 keys (32 pages) lost 3 of 10
# niah_single_1 answers at 4k (trailing digits dropped) where 2048 kept all 10 and every pass key at 8k (same file);
# 2048 decodes 2.37x faster per generated token than the unpatched model at 16k (1024: 2.47x):
# eval/results/decode_patched_smollm2_16k/results.md. Sinks as local's, 64; the exact window 256.
QUEST_PAGE_SIZE = 32
QUEST_TOKEN_BUDGET = 2048
QUEST_WINDOW = 256
QUEST_NUM_SINK_TOKENS = LOCAL_NUM_SINK_TOKENS
