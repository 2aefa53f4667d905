"""The README's commands, run as a user copies them: every command line in its code blocks is
either run here through bash from the repository root (placeholders such as ``<run>`` replaced by
real runs, ``$HOME`` a folder holding small datasets of each format, and the training shortened
by overrides appended at the end) or named in ``NOT_RUN`` with the reason and, for ``run.py``,
composed with ``--cfg job``. A command added to the README without a check here fails
``test_every_readme_command_is_checked``."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from test_datasets import write_cifar, write_idx, write_image_folder, write_npz

SHORT = ("trainer.max_epochs=1", "data.limit=64", "trainer.progress_bar=false",
         "export.num_images=8", "'export.batch_sizes=[1,8]'")
SMALL_INPUT = ("arch.input_size=32",)  # VGG and ResNet at 224 or 128 take minutes on a CPU
ONE_TRIAL = ("hydra.sweeper.n_trials=1",)

# command -> overrides appended to it (each run.py command also gets its own run/sweep folder)
RUN = {
    "python run.py": SHORT,
    "python run.py arch=vgg arch.input_size=32 trainer.max_epochs=1": SHORT,
    "python run.py task=summary arch=vgg16": (),
    "python run.py task=summary arch=vgg16 backend=torch": (),
    "python run.py data=synthetic optim=sgd optim.lr=0.05": SHORT,
    "python run.py -m optim.lr=0.1,0.01": SHORT,
    "python run.py --cfg job": (),
    "python run.py --help": (),
    "python run.py optim.lr=-0.1 data.batch_size=0": (),
    "python run.py arch=vgg16 arch.input_size=16": (),
    "python run.py -m optim.lr=0.01,0.001 data.batch_size=32,64": SHORT,
    "python run.py -m arch=lenet5,alexnet arch.input_size=64 optim=adam": SHORT,
    "python run.py -m launcher=joblib optim.lr=0.1,0.03,0.01,0.003": SHORT,
    "python run.py hparams_search=optuna": SHORT + ONE_TRIAL,
    "python run.py hparams_search=optuna 'optim.lr=tag(log, interval(1e-3, 1))'":
        SHORT + ONE_TRIAL,
    "python run.py data=image_folder data.path=$HOME/data/flowers data.cache=true arch=resnet50 "
    "arch.input_size=128": SHORT + SMALL_INPUT,
    "python run.py data=mnist data.path=$HOME/data/fashion-mnist": SHORT,
    "python run.py data=cifar10 data.path=$HOME/data/cifar-10-batches-py "
    "data.augment.random_crop_padding=4 data.augment.horizontal_flip=true": SHORT,
    "python run.py data=npz data.path=$HOME/data/mine.npz": SHORT,
    "python run.py task=eval eval.run_dir=outputs/lenet5-torch/<run>": (),
    "python run.py task=eval eval.run_dir=<run> data=mnist "
    "data.path=$HOME/data/fashion-mnist": (),
    "python run.py task=predict predict.model=<run>/model.onnx "
    "'predict.inputs=[photo.png,more/]' predict.top_k=3": (),
    "python -m cnnzoo.app.predict <run>/model.onnx photo.png more/ --top-k 3 --json": (),
    "python -m cnnzoo.app.compare outputs/lenet5-torch/<run> "
    "outputs/lenet5-torch/<other run>": (),
    "python -m cnnzoo.app.compare multirun/<date_time>": (),
    "python run.py arch=alexnet arch.input_size=64 hydra.run.dir=runs/alexnet": SHORT,
    "python -m cnnzoo.app.predict <run>/deploy.prototxt photo.png": (),
    "python run.py task=verify arch=xception arch.input_size=32": (),
    "python run.py task=lr_find lr_find.num_steps=50": (),
    "python run.py task=export_weights export_weights.run_dir=<run> export_weights.format=pth": (),
}
NOT_RUN = {
    # pretrained weights: the zoos' files need internet (tests/test_zoo_download.py runs the
    # download against a local server; tests/test_finetune.py trains from weights files)
    "python run.py arch=resnet50 finetune.weights=torchvision:resnet50 data=image_folder "
    "data.path=$HOME/photos": "needs torchvision's file and photos; tests/test_finetune.py",
    "python run.py arch=inception_v3 arch.options.count_include_pad=false "
    "finetune.weights=keras:InceptionV3 data=image_folder data.path=$HOME/photos":
        "needs Keras' file; tests/test_zoo_keras.py proves the variant",
    "python run.py arch=vgg16 finetune.weights=$HOME/Downloads/vgg16-397923af.pth "
    "data=image_folder data.path=$HOME/photos": "needs the file; tests/test_zoo_torch.py reads "
                                                "torchvision's files",
    "python run.py task=verify arch=alexnet verify.weights=gluon:alexnet verify.layers=true":
        "needs Gluon's file; tests/test_layer_report.py runs verify.layers",
    # run elsewhere with assertions on what they write (here they would only run again)
    "python run.py arch=vgg backend=torch": "shortened to input 32 it is the next command, "
                                            "python run.py arch=vgg arch.input_size=32 ...",
    "python run.py task=verify": "tests/test_verify_matrix.py::test_matrix_over_two_"
                                "architectures runs it (LeNet-5 and ResNet-50)",
    "python run.py export.caffe=true 'export.runtimes=[onnxruntime,opencv,openvino]'":
        "tests/test_deploy.py runs it (and export.int8), checking every runtime's report",
    "python run.py export.int8.enabled=true": "tests/test_deploy.py runs it with export.caffe",
    "python run.py task=verify verify.weights=<run>/deploy.prototxt":
        "tests/test_verify_matrix.py::test_verify_lenet5_passes_in_every_backend_and_onnx runs "
        "it on a Caffe model",
    'python3.11 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e '
    '".[all,test]" -e "plugins/cnnzoo-flax[jax]" && python run.py':
        ".ci/run installs this way in a fresh virtualenv, then runs the test suite; python run.py "
        "is checked above",
    "pip install --no-deps --target .zoo-ref torchvision==0.28.0 timm==1.0.31 "
    "safetensors==0.8.0 && pytest": ".ci/run runs it",
    'pip install -e ".[torch]"': ".ci/run installs the PyTorch extra alone in a second virtualenv",
    "pip install --no-deps -e .": "for a machine with its own torch (the GPU check, "
                                  "docs/benchmarks.md)",
    "python run.py hardware=ddp_cpu": "tests/test_cli.py::test_ddp_on_two_cpu_processes_writes_"
                                      "one_run_directory runs it, shortened",
    "python -m bench.accuracy --readme": "trains every architecture for 15 epochs and rewrites "
                                         "README.md; tests/test_bench.py runs it on LeNet-5 for "
                                         "one epoch, with --readme on a copy of the README",
    "python run.py task=verify verify.archs=all verify.input_size=32":
        "the 11 x 3 matrix takes several minutes; tests/test_verify_matrix.py checks its parts",
    "python run.py task=verify verify.archs=all verify.input_size=32 export.caffe=true "
    "'export.runtimes=[onnxruntime,opencv,openvino]'":
        "the matrix with every runtime takes several minutes; tests/test_cli.py exports every "
        "architecture to Caffe and OpenVINO, tests/test_deploy.py runs all three runtimes",
    "python run.py task=verify arch=resnet50 verify.weights=resnet50.npz":
        "needs a ResNet-50 weights file; tests/test_verify_matrix.py runs verify.weights",
    "python run.py hparams_search=optuna hydra.sweeper.n_trials=50 arch=resnet50 "
    "arch.input_size=64": "python run.py hparams_search=optuna (above) with another arch; "
                          "tests/test_cli.py trains ResNet-50",
    "python run.py hparams_search=optuna hydra/sweeper/pruner=median trainer.max_epochs=20":
        "tests/test_optuna.py::test_a_trial_in_another_process_reports_each_epoch_and_is_pruned "
        "runs the median pruner",
    "python run.py hparams_search=optuna hydra/sweeper/sampler=multivariate_tpe":
        "tests/test_optuna.py::test_every_sampler_and_pruner_is_made_from_its_config",
    "python run.py hparams_search=optuna hydra.sweeper.n_trials=64 "
    "hydra.sweeper.storage=postgresql://cnnzoo:secret@db.example.org/optuna":
        "needs that server; tests/test_optuna.py::test_two_sweepers_share_a_study_in_postgresql "
        "runs two sweepers at once on a PostgreSQL server it starts",
    "python run.py hparams_search=optuna hydra.sweeper.storage=/shared/sweeps/study.log":
        "tests/test_optuna.py::test_two_sweepers_share_a_study_in_a_journal_file runs two at once",
    "python run.py arch=resnet50 arch.input_size=32": "tests/test_recipes.py::test_the_paper_"
        "recipe_is_stated_at_the_papers_batch checks the line it prints; the accuracy table "
        "(python -m bench.accuracy) trains it",
    "python run.py arch=resnet50 data.batch_size=128": "tests/test_recipes.py::test_the_rate_"
        "follows_the_global_batch",
    "python run.py arch=resnet50 optim.warmup_epochs=0 optim.scheduler=step":
        "tests/test_recipes.py::test_step_decay_counts_epochs_from_the_start",
    "python run.py optim=sgd optim.lr=0.01 optim.reference_batch=256":
        "tests/test_recipes.py::test_the_rate_follows_the_global_batch",
    "srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 python run.py hardware=multi_node "
    "arch=resnet50": "needs a SLURM cluster",
    "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-endpoint=$HEAD:29500 run.py "
    "hardware=multi_node hardware.num_nodes=2": "needs two machines",
}
_COMMAND = re.compile(r"^(\$ )?(python3?(\.\d+)? |pip |pytest|srun |torchrun )")


def readme_commands() -> dict[str, list[str]]:
    """Each command line of the README's code blocks, fenced or indented (comment removed) ->
    the ``error:`` lines printed under it where the README shows its output (``$ command``)."""
    commands = {}
    text = (ROOT / "README.md").read_text()
    indented = "\n".join(ln[4:] for ln in re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
                         .splitlines() if ln.startswith("    "))
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S) + [indented]:
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not _COMMAND.match(line):
                continue
            shown = []
            for output in lines[i + 1:] if line.startswith("$ ") else []:
                if output.startswith("$ "):
                    break
                shown += [output] if output.startswith("error:") else []
            commands[re.sub(r"\s+# .*$", "", line.removeprefix("$ ")).strip()] = shown
    return commands


def test_every_readme_command_is_checked():
    found = set(readme_commands())
    assert found - set(RUN) - set(NOT_RUN) == set(), "README commands without a check here"
    assert (set(RUN) | set(NOT_RUN)) - found == set(), "checks of commands no longer in README"


def test_ci_installs_and_tests_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[all,test]" -e "plugins/cnnzoo-flax[jax]"' in ci
    assert ("\npip install --no-deps --target .zoo-ref torchvision==0.28.0 timm==1.0.31 "
            "safetensors==0.8.0 && pytest") in ci
    assert '-e ".[torch,test]"' in ci


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A HOME with a dataset of each format under data/, images to predict, and a finished
    default run with Caffe files (plus a copy, and a sweep) for the commands that name earlier
    runs."""
    top = tmp_path_factory.mktemp("readme")
    home = top / "home"
    write_image_folder(home / "data" / "flowers", n_per_class=8)
    write_idx(home / "data" / "fashion-mnist", n_train=80, n_val=20)
    write_cifar(home / "data" / "cifar-10-batches-py", n_batches=1, per_batch=80, n_test=20)
    write_npz(home / "data" / "mine.npz", n=80)
    (top / "more").mkdir()
    for name in ("photo.png", "more/a.png", "more/b.png"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20), np.uint8)).save(
            top / name)
    run = top / "run"
    made = _bash(f"python run.py {' '.join(SHORT)} export.caffe=true hydra.run.dir={run}", home)
    assert made.returncode == 0, made.stderr[-2000:]
    shutil.copytree(run, top / "other")
    sweep = top / "sweep"
    made = _bash(f"python run.py -m optim.lr=0.1,0.01 {' '.join(SHORT)} hydra.sweep.dir={sweep}",
                 home)
    assert made.returncode == 0, made.stderr[-2000:]
    return {"home": home, "outputs/lenet5-torch/<run>": run, "<run>": run,
            "outputs/lenet5-torch/<other run>": top / "other", "multirun/<date_time>": sweep,
            "photo.png": top / "photo.png", "more/": f"{top / 'more'}/"}


@pytest.mark.parametrize("command", list(RUN))
def test_readme_command_runs(command, world, tmp_path):
    shown = readme_commands()[command]
    line = command
    for placeholder in ("outputs/lenet5-torch/<run>", "outputs/lenet5-torch/<other run>",
                        "<run>", "multirun/<date_time>", "photo.png", "more/"):
        line = line.replace(placeholder, str(world[placeholder]))
    extra = list(RUN[command])
    if line.startswith("python run.py") and "--" not in line:
        extra.append(f"hydra.sweep.dir={tmp_path / 'sweep'}" if " -m " in line
                     or "hparams_search" in line else f"hydra.run.dir={tmp_path / 'run'}")
    if "hparams_search=optuna" in line:
        extra.append(f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}")
    # run.py from the repository root; the installed modules (python -m) where they may write
    r = _bash(" ".join([line, *extra]), world["home"],
              ROOT if line.startswith("python run.py") else tmp_path)
    if shown:  # the README shows what it prints: a mistake and its one-line errors
        assert r.returncode == 2 and [ln for ln in r.stderr.splitlines()
                                      if ln.startswith("error:")] == shown, r.stderr[-2000:]
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [c for c in NOT_RUN if c.split("&&")[-1].strip()
                                     .startswith(("python run.py", "srun", "torchrun"))])
def test_readme_commands_not_run_here_still_compose(command):
    """Their run.py part composes (groups, keys and override syntax) with --cfg job (a
    placeholder stands for a path)."""
    args = shlex.split(command[command.index("run.py"):].replace("<run>", "outputs/run"))[1:]
    r = _bash(shlex.join(["python", "run.py", *args, "--cfg", "job"]), Path.home())
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr[-2000:]


def _bash(line: str, home: Path, cwd: Path = ROOT):
    env = {**os.environ, "HOME": str(home), "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
