"""expertbits.tasks: the library, by concern. Each subpackage may import only those listed
before it (and kernels, the bundled zoo); tests/unit/test_layering.py keeps the directions.

    errors, records, meter   bad-input errors, the records tasks pass, wall time and memory
    placement                where the heavy stages compute: --device resolved, dtype, free GPU memory
    store/                   the artifact store: URIs, tables, publishing runs whole, verify, gc, catalog
    checkpoints/             reading checkpoints: fetch, safetensors reader, adapters, reference, texts, watch
    model/                   the quantized folder and running it: packed folder, loader, streaming, export
    quantization/            turning expert matrices into codes: method, writer, routed sequential GPTQ
    allocation/              who gets the bits: statistics, calibration, budget, allocators
    measure/                 how good it is: evaluation, kernel checks, the league table and its plots
    stages/                  the Prefect layer: task wrappers, cache keys, per-layer units of work

`expertbits.tasks.loader` is the deprecated name of `expertbits.tasks.model.load`.
"""
