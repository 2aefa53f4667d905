"""Train, export and verify a classic CNN:  python run.py arch=vgg16 backend=torch

Hydra composes conf/config.yaml with the chosen arch, backend, hardware, data and optim configs;
the returned value is the metric named by ``optimized_metric``, for sweepers."""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from cnnzoo.app.tasks import run_task  # imported here so --help and --cfg stay instant

    return run_task(cfg, HydraConfig.get())


if __name__ == "__main__":
    from cnnzoo.app.cli import run_main  # user mistakes Hydra finds: one line, exit 2

    run_main(main)
