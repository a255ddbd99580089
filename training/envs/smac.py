"""Optional adapter for the real SMAC (`smac.env.StarCraft2Env`, oxwhirl's package installed from its
git repository, which needs StarCraft II). Never the unrelated PyPI package named `smac`.

What the adapter does with `StarCraft2Env` (read from oxwhirl/smac `smac/env/starcraft2/starcraft2.py`):
* Constructor: `map_name`, `seed` and `continuing_episode=True` only. The class takes no episode limit:
  its limit is the map's (`env.episode_limit`, from the map registry), which its `step()` compares the
  step count against. A smaller `EnvConfig.episode_limit` lowers that attribute (so the game's own
  time-out fires there and the env stays consistent); 0 or a larger value keeps the map's limit.
* Time-outs: with `continuing_episode=True` the class marks a time-out with `info["episode_limit"]`
  (its default `False` reports it as a plain termination), so the adapter returns it as a truncation
  and the trainer bootstraps V(final state). A battle won or lost on the last step stays terminated.
* Seeds: the class takes its seed only at construction and uses it when it launches the game (at its
  first `reset()`). `reset(seed)` with a seed other than the running game's builds a new
  `StarCraft2Env(seed=seed)`: free before the first launch, a game relaunch after it. `reset(None)`
  (auto-reset) and `reset(same seed)` continue the running game.
* The game: before launching, `sc2_install_problem` repeats pysc2's run-config lookup ($SC2PATH or the
  platform default, the newest `Versions/Base*` folder, the binary, the SMAC map file) and any gap is an
  `EnvUnavailableError` naming SC2PATH. The constructor and `get_env_info()` need no game.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from lorasa_serve.protocol import pad_obs

from .base import EnvConfig, EnvInfo, EnvUnavailableError, Transition, UnknownTaskError

INSTALL_HINT = ("the real SMAC needs StarCraft II and oxwhirl's smac "
                "(pip install git+https://github.com/oxwhirl/smac.git; never the PyPI package 'smac')")
GAME_HINT = ("install StarCraft II (Linux: the Blizzard headless build unzipped into ~/StarCraftII) and the "
             "SMAC maps into its Maps/SMAC_Maps folder, or set SC2PATH to the install folder")


def import_starcraft2env():
    try:
        from smac.env import StarCraft2Env  # type: ignore[import-not-found]
    except ImportError as e:
        raise EnvUnavailableError(f"SMAC is not installed: {INSTALL_HINT} ({e})") from None
    return StarCraft2Env


def smac_maps() -> dict[str, dict]:
    """SMAC's map registry (name -> n_agents, limit, races, ...)."""
    import_starcraft2env()
    from smac.env.starcraft2.maps import smac_maps as registry  # type: ignore[import-not-found]
    return registry.get_smac_map_registry()


def check_map(name: str) -> None:
    """A clear error for a map SMAC does not have (`StarCraft2Env` itself raises a bare KeyError):
    UnknownTaskError, so the CLIs print it as one line."""
    maps = smac_maps()
    if name not in maps:
        raise UnknownTaskError(f"SMAC has no map {name!r}; its maps: {', '.join(sorted(maps))}")


def _read_execute_info(folder: Path, parents: int) -> str | None:
    """pysc2's `_read_execute_info`: the game folder recorded by the Blizzard launcher (Windows, macOS)."""
    path = folder / "StarCraft II" / "ExecuteInfo.txt"
    if not path.exists():
        return None
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        parts = [p.strip() for p in line.split("=")]
        if len(parts) == 2 and parts[0] == "executable":
            exe = parts[1].replace("\\", "/").rstrip("\0")
            for _ in range(parents):
                exe = os.path.dirname(exe)
            return exe
    return None


def sc2_location() -> tuple[Path, str]:
    """(game folder, binary path inside a Versions/BaseNNNNN folder) as pysc2's run config finds them
    (pysc2/run_configs/platforms.py): $SC2PATH, else the platform's default folder."""
    env = os.environ.get("SC2PATH")
    system = platform.system()
    if system == "Windows":
        base = (env or _read_execute_info(Path("~/Documents").expanduser(), 3)
                or "C:/Program Files (x86)/StarCraft II")
        return Path(base).expanduser(), "SC2_x64.exe"
    if system == "Darwin":
        base = (env or _read_execute_info(Path("~/Library/Application Support/Blizzard").expanduser(), 6)
                or "/Applications/StarCraft II")
        return Path(base).expanduser(), "SC2.app/Contents/MacOS/SC2"
    return Path(env or "~/StarCraftII").expanduser(), "SC2_x64"


def sc2_install_problem(map_name: str) -> str | None:
    """What keeps pysc2 from launching StarCraft II on `map_name` (None: nothing found). Cheap: a few
    stat calls, mirroring what pysc2 checks only after it starts (game version "latest" = the newest
    `Versions/Base*` folder, as smac's `game_version=None` asks)."""
    base, exe = sc2_location()
    where = f"SC2PATH={os.environ['SC2PATH']!r}" if os.environ.get("SC2PATH") else "SC2PATH is not set"
    if not base.is_dir():
        return f"StarCraft II is not installed at {base} ({where})"
    versions = base / "Versions"
    builds = sorted(int(d.name[4:]) for d in versions.iterdir() if d.name.startswith("Base")
                    and d.name[4:].isdigit()) if versions.is_dir() else []
    if not builds:
        return f"no StarCraft II version (Versions/Base*) in {versions} ({where})"
    binary = versions / f"Base{builds[-1]:05d}" / exe
    if not binary.exists():
        return f"no StarCraft II binary at {binary} ({where})"
    smac_map = base / "Maps" / "SMAC_Maps" / f"{map_name}.SC2Map"
    if not smac_map.exists():
        return f"the SMAC map file {smac_map} is missing ({where})"
    return None


def check_sc2_installed(map_name: str) -> None:
    problem = sc2_install_problem(map_name)
    if problem:
        raise EnvUnavailableError(f"{problem}: {GAME_HINT}")


class SMACEnv:
    def __init__(self, cfg: EnvConfig, seed: int = 0):
        check_map(cfg.scenario)
        self.cfg = cfg
        self.env = self._build(seed)
        ei = self.env.get_env_info()
        n = int(ei["n_agents"])
        self.info = EnvInfo(cfg.name, tuple(f"agent_{i}" for i in range(n)), (int(ei["obs_shape"]),) * n,
                            (int(ei["n_actions"]),) * n, int(ei["state_shape"]), "categorical",
                            int(ei["episode_limit"]))

    def _build(self, seed: int):
        """A StarCraft2Env (no game launched yet) seeded with `seed`, its limit lowered to the config's."""
        env = import_starcraft2env()(map_name=self.cfg.scenario, seed=seed, continuing_episode=True)
        if 0 < self.cfg.episode_limit < env.episode_limit:
            env.episode_limit = self.cfg.episode_limit
        self.seed, self.launched, self.episode_counted = seed, False, False
        return env

    def _pack(self, reward=0.0, terminated=False, truncated=False, won=float("nan")) -> Transition:
        obs = pad_obs([np.asarray(o, np.float32) for o in self.env.get_obs()], self.info.obs_max)
        avail = np.asarray(self.env.get_avail_actions(), bool)
        return Transition(obs, np.asarray(self.env.get_state(), np.float32), avail, reward,
                          terminated, truncated, won)

    def reset(self, seed: int | None) -> Transition:
        if seed is not None and seed != self.seed:
            self.env.close()
            self.env = self._build(seed)
        if not self.launched:
            check_sc2_installed(self.cfg.scenario)
        elif not self.episode_counted:  # StarCraft2Env.reset launches a new game until it has counted an
            self.env.close()  # ended episode: close the running one instead of leaking it
        self.env.reset()
        self.launched = True
        return self._pack()

    def step(self, actions: np.ndarray) -> Transition:
        """actions [N] int; StarCraft2Env asserts that each is available."""
        reward, terminated, info = self.env.step([int(a) for a in actions])
        # StarCraft2Env counts an ended episode unless it restarted the game (then it returns info {})
        self.episode_counted |= bool(terminated) and "battle_won" in info
        timed_out = bool(terminated) and bool(info.get("episode_limit", False))
        won = float(bool(info.get("battle_won", False))) if terminated else float("nan")
        return self._pack(float(reward), bool(terminated) and not timed_out, timed_out, won)

    def close(self) -> None:
        self.env.close()
