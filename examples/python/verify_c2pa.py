"""Checks a Kiln image's C2PA manifest with the independent c2pa-python library (PyPI).

Usage: python3 verify_c2pa.py IMAGE.png [TRUST_ANCHORS.pem]

Prints one JSON object: the validation state, the first action of the active manifest (with its
digital source type and software agent) and Kiln's assertion. Exits 1 unless the state is Valid or
Trusted (Trusted is required when trust anchors are given).
"""

import json
import sys

import c2pa


def main() -> int:
    image = sys.argv[1]
    anchors = open(sys.argv[2]).read() if len(sys.argv) > 2 else None
    settings = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if anchors:
        settings["trust"] = {"user_anchors": anchors}
    context = c2pa.Context.from_dict(settings)
    with open(image, "rb") as f:
        reader = c2pa.Reader("image/png", f, context=context)
        state = reader.get_validation_state()
        store = json.loads(reader.json())
    manifest = store["manifests"][store["active_manifest"]]
    actions = [
        action
        for assertion in manifest.get("assertions", [])
        if assertion["label"].startswith("c2pa.actions")
        for action in assertion["data"]["actions"]
    ]
    kiln = next(
        (a["data"] for a in manifest.get("assertions", []) if a["label"] == "org.kiln.generation"),
        None,
    )
    print(json.dumps({
        "state": str(state),
        "claim_generator": manifest.get("claim_generator_info"),
        "first_action": actions[0] if actions else None,
        "kiln": kiln,
    }))
    wanted = ("Trusted",) if anchors else ("Valid", "Trusted")
    return 0 if str(state) in wanted else 1


if __name__ == "__main__":
    sys.exit(main())
