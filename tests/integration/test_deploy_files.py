"""test_deploy_files.py: the deployment files that ship with keel say what keel does.

deploy/kserve/servingruntime.yaml is a ClusterServingRuntime with the fields KServe requires
(supported model formats, protocol versions, the kserve-container with its port, a
readiness probe on /v2/health/ready, Prometheus annotations, a non-root security context that
drops every capability), and its args start a real `keel serve` whose probes answer 200 (the
repository path and port swapped for the test's); deploy/kserve/inferenceservice.yaml names
that runtime with a format and protocol it supports. packaging/Containerfile installs in its
runtime stage (or brings in as a dependency) a package for every library keel and
keel-model-check link (from their NEEDED entries), runs as a non-root user and checks readiness."""

import os
import re
import subprocess

import yaml

import kit
from kit import check

# In every debian:bookworm-slim image (apt itself depends on them).
BASE_IMAGE = {"libc6", "libgcc-s1", "libstdc++6", "libsystemd0", "zlib1g"}


def load(rel):
    with open(os.path.join(kit.SOURCE, rel)) as f:
        return yaml.safe_load(f)


def arg_value(args, name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def runtime():
    rt = load("deploy/kserve/servingruntime.yaml")
    check(rt.get("apiVersion") == "serving.kserve.io/v1alpha1", "apiVersion %r" % rt.get("apiVersion"))
    check(rt.get("kind") in ("ClusterServingRuntime", "ServingRuntime"), "kind %r" % rt.get("kind"))
    check(rt.get("metadata", {}).get("name"), "no metadata.name")
    return rt


def test_servingruntime_fields():
    rt = runtime()
    spec = rt["spec"]
    formats = {f["name"] for f in spec.get("supportedModelFormats", [])}
    check({"xgboost", "onnx"} <= formats, "supportedModelFormats %r" % formats)
    for f in spec["supportedModelFormats"]:
        check(isinstance(f.get("version"), str), "format %s: version must be a string" % f["name"])
    check("v2" in spec.get("protocolVersions", []), "protocolVersions %r" % spec.get("protocolVersions"))
    containers = spec.get("containers", [])
    check(len(containers) == 1 and containers[0].get("name") == "kserve-container",
          "KServe needs exactly one container named kserve-container: %r" % containers)
    c = containers[0]
    args = c.get("args", [])
    check(arg_value(args, "--model-repository") == "/mnt/models",
          "the repository must be KServe's mount point /mnt/models: %r" % args)
    port = int(arg_value(args, "--http-port"))
    check([p["containerPort"] for p in c.get("ports", [])] == [port],
          "ports %r do not match --http-port %d" % (c.get("ports"), port))
    check(port == 8080, "KServe's HTTP port is 8080, got %d" % port)
    probe = c.get("readinessProbe", {}).get("httpGet", {})
    check(probe.get("path") == "/v2/health/ready" and probe.get("port") == port,
          "readinessProbe %r" % probe)
    for ann in (rt["metadata"].get("annotations", {}), spec.get("annotations", {})):
        check(ann.get("prometheus.kserve.io/port") == str(port) and
              ann.get("prometheus.kserve.io/path") == "/metrics", "annotations %r" % ann)
    sc = c.get("securityContext", {})
    check(sc.get("runAsNonRoot") is True, "runAsNonRoot must be true")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")


def test_servingruntime_args_start_keel():
    """The container's args, given to the real keel serve (the image's entrypoint is
    `keel serve`), with only the repository and the port made local."""
    args = runtime()["spec"]["containers"][0]["args"]
    local = []
    for a in args:
        if a.startswith("--model-repository="):
            a = "--model-repository=" + kit.example_repo()
        elif a.startswith("--http-port="):
            a = "--http-port=0"
        elif a.startswith("--http-address="):
            a = "--http-address=127.0.0.1"
        local.append(a)

    class S(kit.Server):
        @property
        def cmd(self):
            return [kit.KEEL, "serve"] + local

    srv = S(kit.example_repo()).start()
    try:
        c = runtime()["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            path = c[probe]["httpGet"]["path"]
            r = kit.get(srv.port, path)
            check(r.status == 200, "%s %s answered %d" % (probe, path, r.status))
        r = kit.get(srv.port, "/metrics")
        check(r.status == 200 and b"# TYPE" in r.body, "/metrics did not answer Prometheus text")
        srv.stop()
    finally:
        if srv.alive():
            srv.kill()


def test_inferenceservice_uses_runtime():
    rt = runtime()
    isvc = load("deploy/kserve/inferenceservice.yaml")
    check(isvc.get("apiVersion") == "serving.kserve.io/v1beta1" and
          isvc.get("kind") == "InferenceService", "apiVersion/kind %r %r"
          % (isvc.get("apiVersion"), isvc.get("kind")))
    model = isvc["spec"]["predictor"]["model"]
    check(model.get("runtime") == rt["metadata"]["name"], "runtime %r" % model.get("runtime"))
    check(model.get("protocolVersion") in rt["spec"]["protocolVersions"],
          "protocolVersion %r not offered by the runtime" % model.get("protocolVersion"))
    check(model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]},
          "modelFormat %r not supported by the runtime" % model["modelFormat"])
    check(model.get("storageUri"), "no storageUri")


def runtime_stage_packages(text):
    stages = re.split(r"^FROM ", text, flags=re.M)
    check(len(stages) == 3, "expected two stages (build, runtime), got %d" % (len(stages) - 1))
    run = stages[2]
    m = re.search(r"apt-get install[^\n]*?((?:\\\n|[^\n])*)", run)
    check(m, "the runtime stage installs no packages")
    words = m.group(1).replace("\\\n", " ").split("&&")[0].split()
    return run, {w for w in words if not w.startswith("-")}


def needed_packages(binary):
    """Package of each library the binary names in NEEDED, through ldd's resolved paths."""
    needed = set(re.findall(r"NEEDED\s+(\S+)",
                            subprocess.run(["objdump", "-p", binary], capture_output=True,
                                           text=True, check=True).stdout))
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, flags=re.M))
    out = {}
    for lib in needed:
        path = paths.get(lib)
        if path is None:
            continue  # the dynamic loader itself
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True,
                               text=True)
        if owner.returncode != 0:
            owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        check(owner.returncode == 0, "no Debian package owns %s (%s)" % (lib, path))
        out[lib] = owner.stdout.split(":")[0]
    return out


def test_containerfile_runtime_packages():
    with open(os.path.join(kit.SOURCE, "packaging", "Containerfile")) as f:
        text = f.read()
    run, pkgs = runtime_stage_packages(text)
    check("bookworm" in text.split("\n")[0] + run.split("\n")[0],
          "the runtime stage must be Debian 12 (bookworm)")
    # What `apt-get install` of that list brings: the packages and their dependencies.
    deps = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends",
                           "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
                           "--no-enhances"] + sorted(pkgs), capture_output=True, text=True)
    check(deps.returncode == 0, "apt-cache depends failed: %s" % deps.stderr[-500:])
    closure = set(pkgs) | {l.strip() for l in deps.stdout.splitlines() if not l.startswith(" ")}
    closure |= {l.split(":", 1)[1].strip() for l in deps.stdout.splitlines()
                if l.strip().startswith("Depends:") and not l.split(":", 1)[1].strip().startswith("<")}
    keel_dir = os.path.dirname(kit.KEEL)
    for binary in (kit.KEEL, os.path.join(keel_dir, "keel-model-check")):
        for lib, pkg in sorted(needed_packages(binary).items()):
            check(pkg in closure or pkg in BASE_IMAGE,
                  "%s needs %s from %s, which the runtime stage does not install (it installs %s)"
                  % (os.path.basename(binary), lib, pkg, " ".join(sorted(pkgs))))
    check(re.search(r"^USER (?!0\b|root\b)", run, flags=re.M), "the runtime stage must not run as root")
    check("HEALTHCHECK" in run and "/v2/health/ready" in run, "no HEALTHCHECK on /v2/health/ready")
    check("/models" in run, "the image has no /models repository")


if __name__ == "__main__":
    kit.run([test_servingruntime_fields, test_servingruntime_args_start_keel,
             test_inferenceservice_uses_runtime, test_containerfile_runtime_packages])
