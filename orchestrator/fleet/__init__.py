"""Fleets: a manifest (``manifest``), a local supervisor (``supervisor``) and renderers (``render``)."""

from orchestrator.fleet.manifest import FleetManifest, load_manifest, parse_manifest

__all__ = ("FleetManifest", "load_manifest", "parse_manifest")
