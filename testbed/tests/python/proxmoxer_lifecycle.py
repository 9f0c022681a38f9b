"""Drives the Proxmox VE simulator with the real proxmoxer client through a VM's whole lifecycle.

Run by testbed/tests/proxmoxer.rs, which starts the simulator and passes its address and credentials in
PVE_SIM_* environment variables. Exits non-zero (with the failed check) if anything differs from what a
real Proxmox VE would do.
"""

import os
import sys
import time
import urllib.parse

from proxmoxer import ProxmoxAPI, ResourceException
from proxmoxer.tools import Tasks

ENV = os.environ
HOST = ENV["PVE_SIM_HOST"]
NODE = ENV.get("PVE_SIM_NODE", "pve")
TEMPLATE = int(ENV["PVE_SIM_TEMPLATE"])
CA = ENV.get("PVE_SIM_CA") or False
SSH_KEYS = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0dGVzdGtleWZvcnRoZXNpbXVsYXRvcg== ops@example.org\n"
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7c29tZXRoaW5n+/= backup:key@host"
)


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def expect_error(call, status, text, errors_key=None):
    """Runs call() and checks it raises proxmoxer's ResourceException with this status and text."""
    try:
        call()
    except ResourceException as e:
        check(e.status_code == status, f"expected {status}, got {e.status_code} {e.content}")
        check(text in e.content, f"expected reason {text!r}, got {e.content!r}")
        if errors_key is not None:
            check(errors_key in (e.errors or {}), f"expected errors[{errors_key}], got {e.errors!r}")
        return e
    check(False, f"expected a ResourceException {status} {text!r}")


def wait(prox, upid, expected="OK"):
    status = Tasks.blocking_status(prox, upid, timeout=60, polling_interval=0.05)
    check(status is not None, f"task {upid} did not finish")
    check(status["exitstatus"] == expected, f"task {upid}: {status['exitstatus']!r} != {expected!r}")
    return status


token = ProxmoxAPI(
    HOST,
    user=ENV["PVE_SIM_TOKEN_USER"],
    token_name=ENV["PVE_SIM_TOKEN_NAME"],
    token_value=ENV["PVE_SIM_TOKEN_VALUE"],
    verify_ssl=CA,
)
ticket = ProxmoxAPI(HOST, user=ENV["PVE_SIM_USER"], password=ENV["PVE_SIM_PASSWORD"], verify_ssl=CA)

# Login with a token and with a ticket; both see the same cluster.
check(token.version.get()["version"] == "9.1.3", "version over a token")
check(ticket.version.get()["release"] == "9.1", "version over a ticket")
nodes = ticket.nodes.get()
check([n["node"] for n in nodes] == [NODE], "node list")
check(nodes[0]["ssl_fingerprint"] == ENV["PVE_SIM_FINGERPRINT"], "the node shows the served certificate's fingerprint")

# nextid is a JSON string.
nextid = token.cluster.nextid.get()
check(isinstance(nextid, str), f"nextid is a string, got {nextid!r}")
vmid = int(nextid)

# Clone the template; the target is locked while the clone runs.
upid = token.nodes(NODE).qemu(TEMPLATE).clone.post(newid=vmid, name="web-1", full=0)
decoded = Tasks.decode_upid(upid)
check(decoded["type"] == "qmclone" and decoded["id"] == str(TEMPLATE), f"clone UPID {upid}")
check(decoded["user"] == ENV["PVE_SIM_TOKEN_USER"], f"token user in {upid}")
check(upid.endswith(f":{ENV['PVE_SIM_TOKEN_USER']}!{ENV['PVE_SIM_TOKEN_NAME']}:"), f"token id in {upid}")
expect_error(lambda: token.nodes(NODE).qemu(vmid).config.post(cores=2), 500, "VM is locked (clone)")
wait(token, upid)

# Duplicate vmid: create and clone into an existing id.
expect_error(
    lambda: token.nodes(NODE).qemu.post(vmid=vmid, name="dup"),
    500,
    f"unable to create VM {vmid} - VM {vmid} already exists on node '{NODE}'",
)
expect_error(
    lambda: token.nodes(NODE).qemu(TEMPLATE).clone.post(newid=vmid),
    500,
    f"unable to create VM {vmid}: config file already exists",
)
expect_error(lambda: token.cluster.nextid.get(vmid=vmid), 400, "Parameter verification failed.", "vmid")

# Configure over the ticket (writes need the CSRF token, which proxmoxer sends).
config = ticket.nodes(NODE).qemu(vmid).config.get()
upid = ticket.nodes(NODE).qemu(vmid).config.post(
    sshkeys=urllib.parse.quote(SSH_KEYS, safe=""),
    ipconfig0="ip=10.20.30.40/24,gw=10.20.30.1",
    tags="Fediversity,owner-web1;fediversity",
    cores=2,
    memory="4096",
    ciuser="ops",
    digest=config["digest"],
)
wait(ticket, upid)
config = token.nodes(NODE).qemu(vmid).config.get()
check(config["name"] == "web-1", f"name {config.get('name')!r}")
check(config["tags"] == "fediversity;owner-web1", f"tags normalised and sorted: {config['tags']!r}")
check(urllib.parse.unquote(config["sshkeys"]) == SSH_KEYS, "sshkeys stored percent-encoded")
check(config["cores"] == 2 and config["memory"] == "4096", f"cores {config['cores']!r} memory {config['memory']!r}")
check(config["agent"] == "1" or config["agent"] == 1, "agent enabled from the template")
check(config["ipconfig0"] == "ip=10.20.30.40/24,gw=10.20.30.1", "ipconfig0")
# A '+' for a space is not strict percent-encoding.
expect_error(
    lambda: token.nodes(NODE).qemu(vmid).config.put(sshkeys=SSH_KEYS.replace(" ", "+")),
    400,
    "Parameter verification failed.",
    "sshkeys",
)
# A stale digest is refused.
expect_error(
    lambda: token.nodes(NODE).qemu(vmid).config.put(cores=4, digest="0" * 40),
    500,
    "checksum mismatch (file change by other user?)",
)

# Start; the guest agent reports the cloud-init address some seconds later.
wait(token, token.nodes(NODE).qemu(vmid).status.start.post())
check(token.nodes(NODE).qemu(vmid).status.current.get()["status"] == "running", "running after start")
wait(token, token.nodes(NODE).qemu(vmid).status.start.post(), f"VM {vmid} already running")
deadline = time.monotonic() + 30
interfaces = None
while interfaces is None:
    try:
        interfaces = token.nodes(NODE).qemu(vmid).agent("network-get-interfaces").get()
    except ResourceException as e:
        check(e.status_code == 500 and "QEMU guest agent is not running" in e.content, f"agent: {e}")
        check(time.monotonic() < deadline, "guest agent never became ready")
        time.sleep(0.1)
eth0 = [i for i in interfaces["result"] if i["name"] == "eth0"]
check(len(eth0) == 1, f"eth0 in {interfaces}")
addresses = [a["ip-address"] for a in eth0[0]["ip-addresses"]]
check("10.20.30.40" in addresses, f"cloud-init address in {addresses}")
mac = config["net0"].split(",")[0].split("=")[1].lower()
check(eth0[0]["hardware-address"] == mac, "agent MAC matches net0")

# Pending: cores on a running VM wait for the next cold start.
ticket.nodes(NODE).qemu(vmid).config.put(cores=4)
pending = {p["key"]: p for p in token.nodes(NODE).qemu(vmid).pending.get()}
check(pending["cores"].get("pending") == 4 and pending["cores"]["value"] == 2, f"pending cores {pending['cores']}")

# A running VM cannot be destroyed; stop, then delete.
expect_error(lambda: token.nodes(NODE).qemu(vmid).delete(), 500, f"VM {vmid} is running - destroy failed")
wait(token, token.nodes(NODE).qemu(vmid).status.stop.post())
wait(token, token.nodes(NODE).qemu(vmid).delete(purge=1, **{"destroy-unreferenced-disks": 1}))

# Missing VM.
expect_error(
    lambda: token.nodes(NODE).qemu(vmid).config.get(),
    500,
    f"Configuration file 'nodes/{NODE}/qemu-server/{vmid}.conf' does not exist",
)
check(int(token.cluster.nextid.get()) == vmid, "a freed VMID is handed out again")

# A locked VM: a full clone takes a while; meanwhile the target refuses changes and cannot start.
upid = ticket.nodes(NODE).qemu(TEMPLATE).clone.post(newid=vmid, full=1, name="full-copy")
expect_error(lambda: ticket.nodes(NODE).qemu(vmid).config.put(cores=1), 500, "VM is locked (clone)")
wait(ticket, ticket.nodes(NODE).qemu(vmid).status.start.post(), "VM is locked (clone)")
resources = [r for r in token.cluster.resources.get(type="vm") if r["vmid"] == vmid]
check(resources and resources[0].get("lock") == "clone", f"lock in cluster resources: {resources}")
# Stopping the clone task removes the half-made VM.
ticket.nodes(NODE).tasks(upid).delete()
wait(ticket, upid, "interrupted by signal")
expect_error(lambda: token.nodes(NODE).qemu(vmid).status.current.get(), 500, "does not exist")

# Unknown routes.
expect_error(lambda: token.nodes(NODE).qemu(TEMPLATE).bogus.get(), 501, "not implemented")
print("proxmoxer lifecycle: all checks passed")
