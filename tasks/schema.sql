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
    max_abs_error DOUBLE  NOT NULL,  -- kernel vs pure-torch dequantize-then-matmul
    rel_error     DOUBLE  NOT NULL,  -- max_abs_error / max |reference output|
    quant_error_ok BOOLEAN NOT NULL, -- every weight within half a step of the original
    passed        BOOLEAN NOT NULL
);

-- One row per evaluation metric.
CREATE TABLE IF NOT EXISTS evaluation (
    metric VARCHAR NOT NULL,  -- 'kl', 'ppl_fp', 'ppl_quant', 'tokens'
    value  DOUBLE  NOT NULL
);
