"""scripts/floors.txt (what the floors job, scripts/setup_floors.sh, installs) pins every direct dependency at
pyproject.toml's lower bound, so a floor bump without a pin bump, or the reverse, fails here."""

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Direct dependencies the floors job cannot hold at their floor, and why.
NOT_PINNED = {"torch": "only the local CPU build (torch==2.13.0) installs on the CI machine"}


def lower_bounds() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / "scripts" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)", line)
            assert match, f"scripts/floors.txt: not an exact pin: {line!r}"
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def test_every_direct_dependency_is_pinned_at_its_lower_bound():
    reqs, pinned = lower_bounds(), pins()
    assert set(pinned) == set(reqs) - set(NOT_PINNED), "scripts/floors.txt and pyproject.toml name different packages"
    for name, req in reqs.items():
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert len(floors) == 1, f"{req}: give exactly one lower bound (>=)"
        if name in NOT_PINNED:
            continue
        assert pinned[name] == floors[0], (f"{name}: pyproject.toml floor {floors[0]}, "
                                           f"scripts/floors.txt {pinned[name]}")
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} outside {req}"


def test_floors_job_installs_the_pins_and_cpu_torch():
    script = (ROOT / "scripts" / "setup_floors.sh").read_text()
    assert "-c scripts/floors.txt" in script and '"torch==2.13.0"' in script
    assert "scripts/setup_floors.sh" in (ROOT / ".ci" / "run").read_text()
