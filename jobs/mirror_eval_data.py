"""Fill an evaluation mirror where the hub is reachable, for clusters that cannot reach it:
`python jobs/mirror_eval_data.py tasks=[mmlu,gsm8k] output=/data/eval-mirror`, or into S3 for a
cluster whose nodes share no disk: `output=s3://bucket/eval-mirror`."""

import hydra
from omegaconf import DictConfig

from neoray.config import to_dict
from neoray.evaluation.mirror import fill_mirror


@hydra.main(config_path="../conf", config_name="mirror_eval_data", version_base=None)
def main(cfg: DictConfig) -> None:
    values = to_dict(cfg)
    written = fill_mirror(list(values["tasks"]), values["output"])
    print(f"{len(written)} files in {values['output']}")


if __name__ == "__main__":
    main()
