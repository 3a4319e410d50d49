#!/usr/local/bin/python
"""The `mc` commands docker-compose.yml runs, against an S3 endpoint with boto3.

mc ready ALIAS                         exit 0 once the server answers ("local": this container)
mc alias set ALIAS URL ACCESS SECRET   remembered in ~/.mc-standin.json
mc mb [--ignore-existing] ALIAS/BUCKET
"""

import json
import sys
import urllib.request
from pathlib import Path

import boto3

ALIASES = Path.home() / ".mc-standin.json"


def aliases() -> dict:
    known = json.loads(ALIASES.read_text()) if ALIASES.exists() else {}
    known.setdefault("local", {"url": "http://127.0.0.1:9000", "access": "local", "secret": "local"})
    return known


def main(argv: list[str]) -> int:
    if argv[:1] == ["ready"]:
        url = aliases()[argv[1]]["url"]
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=3)
        except OSError as exc:
            print(f"not ready: {exc}", file=sys.stderr)
            return 1
        return 0
    if argv[:2] == ["alias", "set"]:
        name, url, access, secret = argv[2:6]
        known = aliases()
        known[name] = {"url": url, "access": access, "secret": secret}
        ALIASES.write_text(json.dumps(known))
        print(f"Added `{name}` successfully.")
        return 0
    if argv[:1] == ["mb"]:
        ignore = "--ignore-existing" in argv
        target = [a for a in argv[1:] if not a.startswith("--")][0]
        name, bucket = target.split("/", 1)
        a = aliases()[name]
        s3 = boto3.client(
            "s3",
            endpoint_url=a["url"],
            aws_access_key_id=a["access"],
            aws_secret_access_key=a["secret"],
            region_name="us-east-1",
        )
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if bucket in existing:
            if ignore:
                print(f"Bucket `{target}` already exists.")
                return 0
            print(f"Bucket `{target}` already exists.", file=sys.stderr)
            return 1
        s3.create_bucket(Bucket=bucket)
        print(f"Bucket created successfully `{target}`.")
        return 0
    print(f"mc stand-in: unsupported command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
