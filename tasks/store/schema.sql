-- expertbits DuckDB schema, version 1. One database per run (runs/<id>/expertbits.duckdb);
-- the statistics stage writes the first two tables, later stages the rest.

-- One row per checkpoint the run read.
CREATE TABLE IF NOT EXISTS checkpoints (
    digest        VARCHAR NOT NULL,  -- sha256 of the sorted per-file sha256 manifest
    uri           VARCHAR NOT NULL,  -- where it was read from
    role          VARCHAR NOT NULL,  -- 'finetuned' | 'reference'
    model_type    VARCHAR NOT NULL,  -- config.json model_type
    layout        VARCHAR NOT NULL,  -- 'per-expert' | 'fused' expert tensors
    moe_layers    INTEGER NOT NULL,
    experts       INTEGER NOT NULL   -- routed experts per MoE layer
);

-- One row per (MoE layer, routed expert): the two numbers the allocation sorts on.
CREATE TABLE IF NOT EXISTS expert_stats (
    layer                 INTEGER NOT NULL,
    expert                INTEGER NOT NULL,
    router_norm           DOUBLE  NOT NULL,  -- ||w_s|| of router row s in the fine-tuned checkpoint
    reference_router_norm DOUBLE,            -- ||w_s|| in the reference; NULL without one
    lambda_score          DOUBLE  NOT NULL,  -- router_norm - reference_router_norm, or router_norm (proxy)
    lambda_source         VARCHAR NOT NULL,  -- 'norm-change' | 'final-norm-proxy'
    maxvar                DOUBLE  NOT NULL,  -- max over first-layer rows of the variance across the input dim
    maxvar_max_norm_row   DOUBLE  NOT NULL,  -- variance of the largest-norm first-layer row (reference code)
    lambda_rank           INTEGER NOT NULL   -- 0 = smallest lambda in its layer (most bits)
);

-- One row per (layer, expert): the bits it gets and why.
CREATE TABLE IF NOT EXISTS bit_allocation (
    layer      INTEGER NOT NULL,
    expert     INTEGER NOT NULL,
    bits       INTEGER NOT NULL,
    position   INTEGER NOT NULL,  -- position in the final order (0 = highest priority)
    reason     VARCHAR NOT NULL   -- e.g. 'lambda rank 0', 'promoted by maxvar over expert 3'
);

-- One row per quantized matrix checked by the Triton kernel.
CREATE TABLE IF NOT EXISTS kernel_validation (
    name          VARCHAR NOT NULL,  -- quantized module name
    bits          INTEGER NOT NULL,
    rows          INTEGER NOT NULL,
    cols          INTEGER NOT NULL,
    kernel_rows   INTEGER NOT NULL,  -- output rows the kernel ran on (a sample in the Triton interpreter)
    max_abs_error DOUBLE  NOT NULL,  -- kernel vs pure-torch dequantize-then-matmul
    rel_error     DOUBLE  NOT NULL,  -- max_abs_error / max |reference output|
    weight_check  VARCHAR NOT NULL,  -- 'half-step' (rtn) or 'grid' (gptq, clipping search), see measure/kernel_check.py
    quant_error_ok BOOLEAN NOT NULL, -- the weight check passed
    weight_error_ratio DOUBLE,       -- ||W - Q||^2 / ||W - RTN(W)||^2 (reported, not judged)
    passed        BOOLEAN NOT NULL
);

-- One row per (MoE layer, case): the fused MoE kernel on the shipped model's own routing of a
-- calibration window, against the float64 reference (tasks/measure/fused_check.py).
CREATE TABLE IF NOT EXISTS fused_validation (
    layer          INTEGER NOT NULL,
    phase          VARCHAR NOT NULL,  -- 'prefill' (the window), 'decode' (its first 4 tokens), 'prefill-bf16' (GPU)
    tokens         INTEGER NOT NULL,
    pairs          INTEGER NOT NULL,  -- routed (token, expert) pairs, dropped slots excluded
    experts_hit    INTEGER NOT NULL,
    experts        INTEGER NOT NULL,
    widths         VARCHAR NOT NULL,  -- 'bits:experts,...' of the layer's gate matrices
    ffn_checked    INTEGER NOT NULL,  -- ffn units the kernel ran on (a prefix in the Triton interpreter)
    ffn            INTEGER NOT NULL,
    hidden_checked INTEGER NOT NULL,  -- output features the kernel ran on
    hidden         INTEGER NOT NULL,
    activation     VARCHAR NOT NULL,  -- 'silu' or 'relu'; '' when the kernel has no fused form of it
    block_m        INTEGER,           -- pairs per M-block of the launch
    gemv_path      BOOLEAN,           -- the GEMV-style path (true) or tl.dot tiles
    max_abs_error  DOUBLE,
    rel_error      DOUBLE,            -- max |kernel - reference| / max |reference|
    model_rel_error DOUBLE,           -- the loaded model's own expert output vs the reference (full layers only)
    rtol           DOUBLE  NOT NULL,  -- the bound rel_error is held to
    passed         BOOLEAN            -- NULL: not applicable (an activation the kernel does not fuse)
);

-- One row per evaluation metric.
CREATE TABLE IF NOT EXISTS evaluation (
    metric VARCHAR NOT NULL,  -- 'kl', 'ppl_fp', 'ppl_quant', 'tokens'
    value  DOUBLE  NOT NULL
);

-- One row per (MoE layer, routed expert): routing on calibration text (tasks/allocation/calibration.py).
CREATE TABLE IF NOT EXISTS expert_calibration (
    layer          INTEGER NOT NULL,
    expert         INTEGER NOT NULL,
    frequency      DOUBLE  NOT NULL,  -- share of tokens with this expert among their top-k
    routing_weight DOUBLE  NOT NULL,  -- mean combine weight the model gave the expert when routed to it
    hessian_trace  DOUBLE  NOT NULL,  -- mean ||x||^2 over the tokens routed to it (0 if none)
    routed_tokens  BIGINT  NOT NULL,  -- calibration tokens routed to this expert
    tokens         BIGINT  NOT NULL   -- calibration tokens seen by this layer
);

-- One row per (layer, expert, bits): what the run's quantizer at those bits costs the expert.
CREATE TABLE IF NOT EXISTS expert_qerror (
    layer              INTEGER NOT NULL,
    expert             INTEGER NOT NULL,
    bits               INTEGER NOT NULL,
    symmetric_quant    BOOLEAN NOT NULL,  -- measured with the symmetric quantizer (no zero points)
    quantizer          VARCHAR NOT NULL,  -- 'rtn', 'rtn+clip', 'gptq', ... ('+sym': symmetric)
    weight_error       DOUBLE  NOT NULL,  -- ||W - Q(W)||_F^2 over the expert's matrices
    routed_input_error DOUBLE  NOT NULL,  -- output error per routed token: RTN sum_i h_i ||dW[:, i]||^2
                                          -- (allocation/calibrate.py), GPTQ tr(dW H dW^T) / tokens (quantization/gptq_sequential.py)
    output_error       DOUBLE             -- the expert's output error per routed token, sum_t r_t^2 ||y_q - y||^2 / tokens,
                                          -- measured by GPTQ's calibration pass only (NULL for RTN's per-layer errors)
);

-- One row per (layer, expert) of a run quantized by GPTQ: the calibration tokens its router sent it
-- during sequential calibration, and the quantizer it got (GPTQ, or RTN below --gptq-min-tokens).
CREATE TABLE IF NOT EXISTS calibration_coverage (
    layer              INTEGER NOT NULL,
    expert             INTEGER NOT NULL,
    calibration_tokens BIGINT  NOT NULL,
    quantizer          VARCHAR NOT NULL   -- e.g. 'gptq' or 'rtn-fallback'
);

-- One row per league cell: an allocator at a budget over a bit-width set (random: one per draw).
CREATE TABLE IF NOT EXISTS league (
    bit_set         VARCHAR NOT NULL,  -- e.g. '2,3,4'
    scheme          VARCHAR NOT NULL,  -- 'two-tier' | 'three-tier' tier counts for rank allocators
    budget          DOUBLE  NOT NULL,  -- requested average bits per expert
    allocator       VARCHAR NOT NULL,
    granularity     VARCHAR NOT NULL,  -- 'expert' | 'layer' (one width per MoE layer)
    symmetric_quant BOOLEAN NOT NULL,  -- quantized without zero points
    quantizer       VARCHAR NOT NULL DEFAULT 'rtn',  -- 'rtn' | 'gptq'
    variant         VARCHAR NOT NULL,  -- allocator + '@layer' / '+sym' / '+gptq' marks
    seed            INTEGER NOT NULL,
    avg_bits        DOUBLE  NOT NULL,  -- achieved nominal average
    effective_bits  DOUBLE  NOT NULL,  -- including fp16 scales, uint8 zero points and packing slack
    kl             DOUBLE  NOT NULL,  -- KL(fp || quant) per token on the evaluation text
    ppl            DOUBLE  NOT NULL,
    ppl_fp         DOUBLE  NOT NULL,
    accuracy       DOUBLE,            -- task accuracy, where the checkpoint has a task
    accuracy_fp    DOUBLE,
    allocation_ms  DOUBLE  NOT NULL   -- time the allocator took, statistics given
);

-- The bits every league cell gave every expert.
CREATE TABLE IF NOT EXISTS league_allocation (
    bit_set   VARCHAR NOT NULL,
    scheme    VARCHAR NOT NULL,
    budget    DOUBLE  NOT NULL,
    allocator VARCHAR NOT NULL,
    variant   VARCHAR NOT NULL,
    seed      INTEGER NOT NULL,
    layer     INTEGER NOT NULL,
    expert    INTEGER NOT NULL,
    bits      INTEGER NOT NULL
);

-- One row per (lm-eval task, metric), only in runs made with --lm-eval-tasks: lm-evaluation-harness
-- on the full-precision checkpoint and on the shipped quantized folder (tasks/measure/harness.py).
CREATE TABLE IF NOT EXISTS lm_eval (
    task             VARCHAR NOT NULL,
    metric           VARCHAR NOT NULL,  -- 'acc', 'acc_norm', 'bits_per_byte', ...; '(filter)' appended when not 'none'
    fp               DOUBLE  NOT NULL,
    fp_stderr        DOUBLE,            -- NULL where lm-eval gives none (perplexities)
    quant            DOUBLE  NOT NULL,
    quant_stderr     DOUBLE,
    diff             DOUBLE  NOT NULL,  -- quant - fp
    higher_is_better BOOLEAN,
    samples          INTEGER            -- examples (or documents) evaluated
);
