"""Fill an evaluation mirror where the hub is reachable, for clusters that cannot reach it:
`python jobs/mirror_eval_data.py tasks=[mmlu,gsm8k] output=/data/eval-mirror`, or into S3 for a
cluster whose nodes share no disk: `output=s3://bucket/eval-mirror`; with a suite's own task
folders: `task_dirs=[my_tasks]` (their files and the data of every task in them)."""

import hydra
from omegaconf import DictConfig

from neoray.config import to_dict
from neoray.evaluation.mirror import fill_mirror


@hydra.main(config_path="../conf", config_name="mirror_eval_data", version_base=None)
def main(cfg: DictConfig) -> None:
    values = to_dict(cfg)
    written = fill_mirror(
        list(values["tasks"]), values["output"], list(values.get("task_dirs") or [])
    )
    print(f"{len(written)} files in {values['output']}")


if __name__ == "__main__":
    main()
