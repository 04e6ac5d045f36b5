"""Private helpers of the `aimet_quantization` pass (passes/aimet_quantization.py); not passes.

- `support`: module trees whose every compute op AIMET can quantize (`make_quantizable`), AIMET's
  logging kept off the console, frozen weight encodings;
- `sim`: the sim as a pipeline component (`QuantizedComponent`, whose `export_onnx` writes the QDQ
  graph), calibration records, the op census, the QDQ graph's check against the sim, and weight
  bytes at a quantized precision;
- `state`: the pass's state in a saved pipeline (quantizer encodings, one example call) and the sims
  rebuilt from it.

The Snapdragon target's QDQ export (targets/quantized.py) imports none of this: it asks the
`QuantizedComponent` modules the pass left in the pipeline duck-typed (`export_onnx`). Nothing
outside the pass and its tests should import this package; its names may change with the pass.
"""
