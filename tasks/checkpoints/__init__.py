"""Reading checkpoints without instantiating them: fetching into the content-addressed cache
(fetch), the safetensors reader (reader), one adapter per architecture (adapters), the reference Λ
is measured against (reference), the calibration and evaluation texts and their token windows
(texts, span_corruption), and finding checkpoints under watched prefixes (watch).

May import: expertbits.tasks.store and the root modules; expertbits.zoo.
"""
