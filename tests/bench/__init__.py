"""`sessa-scale bench` (sessa_scale/bench): communication share, layer, parallel and train benchmarks."""
