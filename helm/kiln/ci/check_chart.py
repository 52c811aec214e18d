#!/usr/bin/env python3
"""Adapter between tests/deploy.rs and the Python checking tools (the test asserts on the results).

  check_chart.py lint CHART VALUES...          helm lint --strict, once per values file
  check_chart.py render CHART OUTDIR VALUES... helm template: OUTDIR/<values stem>.yaml and .json
  check_chart.py yaml2json FILE                one YAML document as JSON on stdout

Helm runs in-process through helm-python-sdk (Helm's own Go library), offline.
"""

import json
import pathlib
import sys

import yaml

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion): gRPC probes are GA from 1.27.
KUBE_VERSION = "v1.27.0"


def load_values(path):
    values = yaml.safe_load(pathlib.Path(path).read_text())
    return values or {}


def lint(chart, values_files):
    import helm_python as helm

    failed = False
    for values_file in values_files:
        report = helm.lint(chart, load_values(values_file), strict=True, kube_version=KUBE_VERSION)
        # Severity 1 is information ("icon is recommended"); 2 warning, 3 error.
        problems = [m for m in report["messages"] if m["severity"] >= 2] + [
            {"severity": 3, "path": "", "error": e} for e in report["errors"]
        ]
        for m in report["messages"]:
            print(f"{values_file}: severity {m['severity']} {m['path']}: {m['error']}")
        if problems or report["total_charts_linted"] != 1:
            failed = True
            print(f"FAIL {values_file}: {problems}")
        else:
            print(f"ok {values_file}")
    return 1 if failed else 0


def render(chart_dir, out_dir, values_files):
    import helm_python as helm

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with helm.Chart.load(chart_dir) as chart:
        for values_file in values_files:
            rendered = chart.render(
                load_values(values_file), name="kiln", namespace="kiln", is_install=True
            )
            texts = [
                text
                for name, text in sorted(rendered.items())
                if name.endswith((".yaml", ".yml")) and text.strip()
            ]
            stream = "".join(f"---\n{t.strip()}\n" for t in texts)
            docs = [d for d in yaml.safe_load_all(stream) if d]
            stem = pathlib.Path(values_file).name.removesuffix(".yaml")
            (out / f"{stem}.yaml").write_text(stream)
            (out / f"{stem}.json").write_text(json.dumps(docs, indent=1))
            print(f"{values_file}: {len(docs)} manifests")
    return 0


def main(argv):
    if len(argv) >= 3 and argv[1] == "lint":
        return lint(argv[2], argv[3:])
    if len(argv) >= 4 and argv[1] == "render":
        return render(argv[2], argv[3], argv[4:])
    if len(argv) == 3 and argv[1] == "yaml2json":
        print(json.dumps(yaml.safe_load(pathlib.Path(argv[2]).read_text())))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
