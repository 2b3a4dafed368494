"""What an installed (non-editable) package needs: its Hydra configs as package data, a data folder it is told.

Building a wheel needs setuptools' wheel support, which the development environment does not have
offline, so this checks the declaration instead: every config file is matched by ``setup.cfg``'s
package data (setuptools globs relative to the package) and Hydra composes from the package's folder.
"""

from __future__ import annotations

import configparser
from importlib import resources
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_dhp.app.main import CONF_DIR, build_datasets
from lightning_dhp.data.lengths import LengthFileError
from lightning_dhp.data.video_digits import TEXT_TOKENS_PER_SAMPLE

REPO = Path(__file__).resolve().parents[1]


def _package_data_patterns() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    declared = parser["options.package_data"]["lightning_dhp"]
    return [pattern.strip() for pattern in declared.replace("\n", ",").split(",") if pattern.strip()]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="vlm_finetune", overrides=list(overrides))


def test_every_config_file_ships_as_package_data():
    package = Path(str(resources.files("lightning_dhp")))
    assert package / "conf" == CONF_DIR, "the app must read its configs from inside the package"
    configs = {path for path in CONF_DIR.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert package / "conf" / "vlm_finetune.yaml" in configs and len(configs) >= 10
    shipped = {path for pattern in _package_data_patterns() for path in package.glob(pattern)}
    assert sorted(configs - shipped) == [], "add these to [options.package_data] in setup.cfg"


@pytest.mark.parametrize(("strategy", "static_degree"), [("dhp", None), ("static_cp", 2), ("data_parallel", 1)])
def test_each_strategy_config_composes_from_the_package(strategy, static_degree):
    cfg = _compose(f"strategy={strategy}")
    assert cfg.strategy.static_degree == static_degree
    assert cfg.strategy._target_ == "lightning_dhp.DHPStrategy"


def test_the_data_folder_comes_from_data_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("DHP_DATA_DIR", raising=False)
    assert _compose().data.data_dir is None, "the default must stay $DHP_DATA_DIR, then ../shared/data"
    (tmp_path / "durations.csv").write_text("duration_s\n16\n16\n")  # 2 frames at 0.125 fps
    cfg = _compose(f"data.data_dir={tmp_path}", "data.metadata_file=durations.csv", "data.frame_sizes=[16]",
                   "data.num_train=4", "data.num_val=2", "eval.num_samples=2")
    train_set, _, _ = build_datasets(cfg)
    assert train_set.lengths.tolist() == [2 * 2 * 2 + TEXT_TOKENS_PER_SAMPLE] * 4  # 2 frames of 2x2 patches
    with pytest.raises(LengthFileError, match=f"data directory {tmp_path / 'missing'} .*does not exist"):
        build_datasets(_compose(f"data.data_dir={tmp_path / 'missing'}"))
