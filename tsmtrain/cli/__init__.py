"""The ``tsmtrain`` command. It parses arguments and delegates; the work is in the library.

One module per command group; each command parses its options, calls one library function and
prints what it returns:

* :mod:`.training`: ``run`` (:func:`tsmtrain.train.train`), ``validate`` (the resolved recipe),
  ``model-info`` (:mod:`tsmtrain.models` parameter and multiply-add counts)
* :mod:`.export`: ``export`` (:func:`tsmtrain.eval.export_check.export_checked`: the network as
  an ONNX or TorchScript file, checked on a clip against PyTorch)
* :mod:`.testing`: ``test`` (:func:`tsmtrain.eval.protocols.run_test`), ``predict``
  (:func:`tsmtrain.eval.protocols.predict_videos`), ``fuse`` (:func:`tsmtrain.eval.fusion.fuse_runs`:
  late fusion of tested runs)
* :mod:`.weights`: ``convert`` (:func:`tsmtrain.models.weights.convert_weights`: weights from
  one project's format to another's)
* :mod:`.features`: ``extract`` (:func:`tsmtrain.eval.extract.extract_features`: features of
  every video for training the head alone, ``data.features``)
* :mod:`.cluster`: ``render`` (:func:`tsmtrain.dist.slurm.render_sbatch`), ``submit``
  (:func:`tsmtrain.dist.slurm.submit`), ``env`` (:func:`tsmtrain.dist.base.describe_rank` on
  every rank), and the cluster flags of ``render``, ``submit`` and ``sweep``
* :mod:`.doctor`: ``doctor`` (:func:`tsmtrain.bench.doctor.run_doctor`: a node's readiness
  table and figures)
* :mod:`.data`: ``prepare`` (:mod:`tsmtrain.prep.encode`: re-encode the videos for training)
* :mod:`.benchmarks`: ``bench data`` (:mod:`tsmtrain.bench.data`), ``bench step``
  (:func:`tsmtrain.bench.step.bench_step`)
* :mod:`.scaling`: ``sweep`` (:mod:`tsmtrain.scaling.sweep`), ``report``
  (:mod:`tsmtrain.scaling.report`, :mod:`tsmtrain.scaling.model`)

This package registers the commands on the :data:`app`; what the commands share (:func:`fail`,
:func:`load`, :func:`with_np`, :func:`relaunch`, :func:`user_errors`) is in :mod:`.common`.

User mistakes (bad recipe, bad list file, missing launcher, impossible job) print one line per
problem and exit with status 2, never a traceback. A run stopped by SIGUSR2 or SIGTERM after its
checkpoint exits with :data:`tsmtrain.dist.stop.EXIT_PREEMPTED` (75); Ctrl-C exits 130. Nothing
in the library imports this package.
"""

from __future__ import annotations

from . import benchmarks, cluster, data, doctor, export, features, scaling, testing, training, weights
from .common import SET_HELP, app, fail, load, relaunch, set_args, user_errors, with_np

__all__ = ["app", "bench_app", "fail", "load", "with_np", "relaunch", "set_args", "user_errors", "SET_HELP"]


# registered in the order ``tsmtrain --help`` lists them
for _name, _command in (("run", training.run), ("test", testing.test), ("predict", testing.predict),
                        ("fuse", testing.fuse), ("extract", features.extract),
                        ("validate", training.validate), ("model-info", training.model_info),
                        ("convert", weights.convert), ("export", export.export),
                        ("prepare", data.prepare), ("render", cluster.render), ("submit", cluster.submit),
                        ("env", cluster.env), ("doctor", doctor.doctor),
                        ("sweep", scaling.sweep), ("report", scaling.report)):
    app.command(_name)(_command)
del _name, _command

bench_app = benchmarks.bench_app
app.add_typer(bench_app, name="bench")
