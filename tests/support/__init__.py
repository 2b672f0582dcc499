"""What the tests share: tiny random models of every architecture (archs), an independent reference
for the packed runtime (reference), `expertbits quantize` in its own process (runner), a flaky S3
in front of moto (faultproxy), reading flow runs back from the Prefect API (flowruns) and a
mixed-width quantized folder (quantized)."""
