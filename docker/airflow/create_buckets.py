"""One-shot (compose service minio-init): create the buckets that the given s3:// URIs name, and
seed the demo corpus where the pipeline's corpus is still empty, so that a fresh
`docker compose up` can run lm_pipeline at once. Safe to run again.

    python create_buckets.py [--demo-corpus s3://lmpipe/corpus --demo-mb 8] s3://lmpipe s3://mlflow/artifacts
"""

import argparse
import subprocess
import sys
import time
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError


def ensure_bucket(s3, name: str) -> None:
    for _ in range(30):  # MinIO may still be starting up
        try:
            s3.head_bucket(Bucket=name)
            print(f"bucket {name}: exists")
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=name)
            print(f"bucket {name}: created")
            return
        except EndpointConnectionError:
            time.sleep(2)
    raise SystemExit(f"S3 endpoint {s3.meta.endpoint_url} did not answer")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("uris", nargs="+", help="s3:// URIs whose buckets must exist (other URIs are skipped)")
    p.add_argument("--demo-corpus", help="write the demo corpus here if nothing is there yet")
    p.add_argument("--demo-mb", type=float, default=0, help="demo corpus size in MB (0: no demo corpus)")
    args = p.parse_args(argv)
    s3 = boto3.client("s3")  # AWS_ENDPOINT_URL and the credentials come from the environment
    for bucket in sorted({urlparse(u).netloc for u in [*args.uris, args.demo_corpus or ""] if u.startswith("s3://")}):
        ensure_bucket(s3, bucket)
    if args.demo_corpus and args.demo_corpus.startswith("s3://") and args.demo_mb > 0:
        u = urlparse(args.demo_corpus)
        if s3.list_objects_v2(Bucket=u.netloc, Prefix=u.path.lstrip("/"), MaxKeys=1).get("KeyCount", 0) == 0:
            print(f"seeding {args.demo_corpus} with a {args.demo_mb:g} MB demo corpus")
            subprocess.run([sys.executable, "-m", "lmpipe.cli", "demo-corpus", "--out", args.demo_corpus,
                            "--max-mb", str(args.demo_mb)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
