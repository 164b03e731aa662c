"""`hdmap-ad gpu-check`: every CUDA path end to end (training at each precision, the feature cache on
and off, evaluate, predict, the MLflow pyfunc model, resume, the benchmark) with one report.

command plans the parts, runs each in a fresh process through worker, checks the results and writes
the report; on a CPU it runs the same parts at tiny shapes, which is how CI proves it works.
"""

from hdmap_ad.apps.gpucheck.command import add_parser, cmd_gpu_check

__all__ = ["add_parser", "cmd_gpu_check"]
