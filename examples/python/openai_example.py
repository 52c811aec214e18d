"""Calls Kiln's OpenAI-compatible Images API with OpenAI's official Python client, unchanged but for
the base URL and the key.

    python openai_example.py generate "a red star" star.png [--size 64x64] [--n 2]
    python openai_example.py stream "a red star" star.png [--partial-images 2]
    python openai_example.py expect RateLimitError "a red star" [--size 64x64]

`generate` writes the image (with --n, star-0.png, star-1.png, ...) and prints the usage; `stream`
streams it, writing each preview (star.partial-0.png, ...) as it comes and printing every event;
`expect`
exits 0 only when the call fails with that `openai` exception class (AuthenticationError,
BadRequestError, PermissionDeniedError, RateLimitError, NotFoundError, ...) and prints its status,
code, param and headers. Environment: KILN_OPENAI_BASE_URL (default http://127.0.0.1:8080/v1),
KILN_API_KEY, and KILN_MODEL (default kiln-shapes, the model `kiln up` serves; --model overrides it). Needs the `openai` package (scripts/openai-venv.sh makes a venv with it).
"""

import argparse
import base64
import os
import pathlib
import sys

import openai


def client(retries: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=os.environ.get("KILN_OPENAI_BASE_URL", "http://127.0.0.1:8080/v1"),
        api_key=os.environ["KILN_API_KEY"],
        max_retries=retries,
    )


def generate(args) -> int:
    result = client(retries=2).images.generate(
        model=args.model,
        prompt=args.prompt,
        size=args.size,
        n=args.n,
        response_format="b64_json",
    )
    out = pathlib.Path(args.out)
    for i, image in enumerate(result.data):
        path = out if args.n == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        path.write_bytes(base64.b64decode(image.b64_json))
        print(f"wrote {path}")
    print(f"images: {len(result.data)}")
    print(f"usage: input {result.usage.input_tokens} output {result.usage.output_tokens}")
    return 0


def stream(args) -> int:
    events = client(retries=2).images.generate(
        model=args.model,
        prompt=args.prompt,
        size=args.size,
        stream=True,
        partial_images=args.partial_images,
    )
    out = pathlib.Path(args.out)
    for event in events:
        if event.type == "image_generation.partial_image":
            path = out.with_name(f"{out.stem}.partial-{event.partial_image_index}{out.suffix}")
            path.write_bytes(base64.b64decode(event.b64_json))
            print(f"event: partial {event.partial_image_index} -> {path}")
        elif event.type == "image_generation.completed":
            out.write_bytes(base64.b64decode(event.b64_json))
            print(f"event: completed -> {out}")
        else:
            print(f"event: {event.type}")
    return 0


def expect(args) -> int:
    wanted = getattr(openai, args.error)
    try:
        client(retries=0).images.generate(
            model=args.model, prompt=args.prompt, size=args.size, response_format="b64_json"
        )
    except wanted as e:
        body = e.body if isinstance(e.body, dict) else {}
        print(f"status: {e.status_code}")
        print(f"code: {body.get('code')}")
        print(f"param: {body.get('param')}")
        print(f"message: {body.get('message')}")
        for name, value in sorted(e.response.headers.items()):
            if name.startswith(("x-ratelimit", "retry-after", "x-request-id")):
                print(f"header {name}: {value}")
        return 0
    except openai.APIError as e:
        print(f"expected {args.error}, got {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"expected {args.error}, but the call succeeded", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("prompt")
    g.add_argument("out")
    g.add_argument("--size", default="64x64")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--model", default=os.environ.get("KILN_MODEL", "kiln-shapes"))
    st = sub.add_parser("stream")
    st.add_argument("prompt")
    st.add_argument("out")
    st.add_argument("--size", default="64x64")
    st.add_argument("--partial-images", type=int, default=2)
    st.add_argument("--model", default=os.environ.get("KILN_MODEL", "kiln-shapes"))
    e = sub.add_parser("expect")
    e.add_argument("error")
    e.add_argument("prompt")
    e.add_argument("--size", default="64x64")
    e.add_argument("--model", default=os.environ.get("KILN_MODEL", "kiln-shapes"))
    args = parser.parse_args()
    return {"generate": generate, "stream": stream, "expect": expect}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
