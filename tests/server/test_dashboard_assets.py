"""The dashboard's assets without a browser (these run where chromium or Playwright is missing): served at `/` and
`/static/` with the Content-Security-Policy and no key, nothing else of the package served, every asset shipped as
package data, the vendored library with its licence, and no HTML built from strings anywhere in the scripts."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import httpx

from server.dashboard import ASSETS

ROOT = Path(__file__).resolve().parents[2]


def assets() -> list[str]:
    return sorted(p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def test_every_asset_is_package_data_and_the_vendored_library_has_its_licence():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "server.dashboard"]
    missing = [a for a in assets() if not any(fnmatch.fnmatch(a, p) and a.count("/") == p.count("/") for p in patterns)]
    assert not missing, f"not in pyproject's package-data, so `pip install .` would not ship them: {missing}"
    vendor = ASSETS / "static" / "vendor"
    assert (vendor / "uPlot.iife.min.js").read_text().startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32)")
    assert "MIT License" in (vendor / "uPlot.LICENSE").read_text()


def test_scripts_never_build_html_from_strings():
    sources = {p.name: p.read_text() for p in (ASSETS / "static" / "js").rglob("*.js")}
    assert len(sources) >= 10
    for name, text in sources.items():
        code = re.sub(r"^\s*//.*$", "", text, flags=re.M)  # comments may name what the code avoids
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert code.find(sink) < 0, f"{name} uses {sink}"
    page = (ASSETS / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script"
    assert not re.search(r"\s(on\w+|style)=", page), "inline handler or style"


def test_served_without_a_key_with_csp_and_nothing_else_of_the_package(live):
    base = live.url.removesuffix("/api/v1")
    with httpx.Client(base_url=base, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert 'src="/static/js/main.js"' in page.text and "{{ROOT}}" not in page.text
        for asset in assets():
            if asset.startswith("static/"):
                r = c.get("/" + asset)
                assert r.status_code == 200, asset
                assert r.headers["content-security-policy"] == csp, asset
                assert r.headers["cache-control"] == "no-cache" and r.headers["etag"], asset  # revalidated
        assert c.get("/static/js/main.js").headers["content-type"].startswith("text/javascript")
        for path in ("/static/../__init__.py", "/static/__init__.py", "/static/%2e%2e/__init__.py", "/index.html"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path
        r = c.get("/runs/create", params={"config": "abc<x>"}, follow_redirects=False)
        assert r.status_code == 302 and r.headers["location"] == "/#/new?config=abc%3Cx%3E"
        assert c.get("/api/v1/runs").status_code == 401  # the data still needs a key
