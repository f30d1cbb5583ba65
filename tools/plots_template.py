"""Rebuild `.dvc/plots_offline.html`: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined from the npm
registry, so `dvc plots show` / `dvc plots diff` draw without reaching a CDN (`make plots-template`)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = (("vega", "5.33.1", "vega.min.js"), ("vega-lite", "5.23.0", "vega-lite.min.js"),
            ("vega-embed", "6.29.0", "vega-embed.min.js"))  # pinned: the versions the browser test draws with
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots_offline.html"
HEAD = """<!DOCTYPE html>
<!-- `dvc plots show/diff` page that draws offline: Vega, Vega-Lite and Vega-Embed are inlined below
     instead of DVC's CDN links (.dvc/config: plots.html_template). Rebuilt by `make plots-template`. -->
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <style>
        table { border-spacing: 15px; }
    </style>
"""
TAIL = """
<script type="text/javascript">
    // every chart as SVG (its lines and legend are in the page, for a reader's tools and the browser test);
    // window.dvcPlotViews holds the Vega views
    (function () {
        var embed = window.vegaEmbed;
        window.dvcPlotViews = [];
        window.vegaEmbed = function (el, spec, opt) {
            return embed(el, spec, Object.assign({renderer: "svg"}, opt || {})).then(function (result) {
                window.dvcPlotViews.push(result.view);
                return result;
            });
        };
    })();
</script>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> int:
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, build in PACKAGES:
            tgz = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            with tarfile.open(Path(tmp) / tgz) as tar:
                js = tar.extractfile(f"package/build/{build}").read().decode()
            if "</script" in js:
                sys.exit(f"error: {name}@{version}/build/{build} contains '</script'; it cannot be inlined")
            scripts.append(f"<!-- {name}@{version} (npm registry, BSD-3-Clause, https://vega.github.io) -->\n"
                           f"<script type=\"text/javascript\">\n{js}\n</script>")
    OUT.write_text(HEAD + "\n".join(scripts) + TAIL)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
