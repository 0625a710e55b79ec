"""Many virtual sites in few site worker processes: each its own data, state and identity, and
a round over them through the same Dagster assets and gRPC path as production."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from site_worker.cli import settings_from_args
from tests.pipelines.conftest import RoundEnv
from twin_core.cohort import DEFAULT_SITES, simulated_sites
from twin_core.errors import SiteCallError
from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.definitions import build_definitions
from twin_pipelines.local_fleet import LocalFleet, SiteLaunch
from twin_pipelines.resources import GrpcFleet, MlflowRegistry, RoundStore
from twin_wire.client import GrpcSite

pytestmark = pytest.mark.integration
N_SITES = 12  # two workers of six virtual sites each: every default profile at least twice


def test_simulated_sites_cycle_the_reference_profiles():
    sites = simulated_sites(N_SITES)
    assert [s.site_id for s in sites[:3]] == ["site-01", "site-02", "site-03"]
    assert sites[5].n_patients == sites[0].n_patients == DEFAULT_SITES[0].n_patients
    assert simulated_sites(5) == DEFAULT_SITES  # five are the reference table itself
    with pytest.raises(ValueError, match="at least one site"):
        simulated_sites(0)


def test_worker_settings_for_virtual_sites(tmp_path: Path):
    settings = settings_from_args(
        ["--site-id", "a,b", "--site-id", "c", "--synthetic", "--state-dir", str(tmp_path)]
        + ["--insecure", "--cohort-sites", "3"]
    )
    assert settings.site_ids == ("a", "b", "c") and settings.cohort_sites == 3
    assert settings.state_of("b") == tmp_path / "b"  # a state folder per virtual site
    one = settings_from_args(
        ["--site-id", "a", "--synthetic", "--state-dir", str(tmp_path), "--insecure"]
    )
    assert one.state_of("a") == tmp_path  # a hospital's single site: the folder itself
    with pytest.raises(ValueError, match="lists a site twice"):
        settings_from_args(["--site-id", "a,a", "--synthetic", "--state-dir", "x", "--insecure"])
    with pytest.raises(ValueError, match=r"put \{site\} in --data"):
        settings_from_args(
            ["--site-id", "a,b", "--data", "x.csv", "--schema", "s.yaml"]
            + ["--state-dir", "x", "--insecure"]
        )
    files = settings_from_args(
        ["--site-id", "a,b", "--data", "d/{site}.csv", "--schema", "s.yaml"]
        + ["--state-dir", "x", "--insecure"]
    )
    assert files.data_of("b") == Path("d/b.csv")


@pytest.fixture(scope="module")
def virtual_fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("virtual")
    ids = [s.site_id for s in simulated_sites(N_SITES)]
    launches = [
        SiteLaunch(f"worker-{w + 1}", synthetic=True, cohort_sites=N_SITES, sites=tuple(part))
        for w, part in enumerate((ids[:6], ids[6:]))
    ]
    with LocalFleet(tmp / "sites") as workers:
        workers.start(launches)
        yield tmp, workers


def test_each_virtual_site_has_its_own_data_and_state(virtual_fleet):
    _, workers = virtual_fleet
    endpoints = workers.endpoints()
    assert len(endpoints) == N_SITES and len(set(endpoints.values())) == 2
    assert len(workers.workers()) == 2
    infos = {s: GrpcSite(s, a).info(timeout=30) for s, a in endpoints.items()}
    profiles = {p.site_id: p for p in simulated_sites(N_SITES)}
    for site_id, info in infos.items():
        assert info.site_id == site_id
        assert info.units == profiles[site_id].n_patients
    # same profile, different patients: site-01 and site-06 are both 20-patient site-1s
    assert infos["site-01"].moments != infos["site-06"].moments
    # a site the worker does not host is refused by name
    with pytest.raises(SiteCallError, match="NOT_FOUND"):
        GrpcSite("site-07", endpoints["site-01"]).info(timeout=10)
    assert workers.sites["site-02"].state_dir.name == "site-02"


def test_a_round_over_virtual_sites_runs_through_dagster_and_grpc(virtual_fleet, mlflow_uri):
    tmp, workers = virtual_fleet
    uri, artifacts = mlflow_uri
    store = RoundStore(root=str(tmp / "rounds"))
    registry = MlflowRegistry(tracking_uri=uri, artifact_root=str(artifacts), model_name="virtual")
    # two receive slots: however many sites finish at once, at most two updates are in the
    # orchestrator's memory together
    fleet = GrpcFleet(
        endpoints=",".join(f"{s}={a}" for s, a in workers.endpoints().items()),
        insecure=True,
        receive_slots=2,
    )
    env = RoundEnv(build_definitions(fleet=fleet, store=store, registry=registry), store, registry)
    with dg.instance_for_test() as instance:
        result = run_round(env.defs, instance, RoundConfig(min_sites=N_SITES, local_epochs=1))
    assert result.success, result.error
    assert len(result.sites) == N_SITES and not result.failed_sites
    assert 1 <= fleet.slots().peak <= 2
    assert sorted(p.stem for p in (store.round_dir(result.round_key) / "updates").iterdir()) == [
        s.site_id for s in simulated_sites(N_SITES)
    ]
    # each virtual site journals its own work in its own state folder
    for site_id in ("site-01", "site-12"):
        journal = workers.sites[site_id].state_dir / "journal.jsonl"
        kinds = [json.loads(line)["kind"] for line in journal.read_text().splitlines()]
        assert "train" in kinds and "evaluate" in kinds
    assert env.versions()


def test_the_demo_hosts_many_sites_as_virtual_sites(tmp_path: Path):
    """`twin demo --sites N`: up to 10 sites one worker each, beyond that 4 workers (or
    --workers) hosting them as virtual sites, each site reading its own file."""
    from twin_pipelines.cli import _launches
    from twin_pipelines.home import TwinHome

    home = TwinHome(tmp_path / "home")
    five = _launches(home, 7, 5)
    assert [(x.site_id, x.hosting) for x in five][:2] == [
        ("site-1", ("site-1",)),
        ("site-2", ("site-2",)),
    ]
    many = _launches(home, 7, 30)
    assert [len(x.hosting) for x in many] == [8, 8, 8, 6]
    assert [s for x in many for s in x.hosting] == [s.site_id for s in simulated_sites(30)]
    assert "{site}" in str(many[0].data) and "--site-id" in many[0].args()
    assert len(list((home.cohort / "sites").glob("*.csv"))) == 30
    assert [len(x.hosting) for x in _launches(home, 7, 30, workers=3)] == [10, 10, 10]
