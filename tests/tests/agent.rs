//! The real `p2p-usb-agent` against the real helper: device table, readiness,
//! and surviving the helper's death.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use p2p_usb_tests::*;

fn agent(config: &std::path::Path, notify: &NotifySocket, log: std::path::PathBuf) -> Process {
    let mut command = Command::new(bin("p2p-usb-agent"));
    command
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "2000000")
        .env("RUST_LOG", "debug");
    if nix::unistd::geteuid().is_root() {
        command.arg("--allow-root");
    }
    Process::spawn(command, log)
}

#[test]
fn serving_as_root_needs_the_development_flag() {
    // Tests run as root in CI; a normal user cannot check this.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let helper = start_activated_helper("", None);
    let output = Command::new(bin("p2p-usb-agent"))
        .arg("--config")
        .arg(&helper.config)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(p2p_usb_common::exit::NOPERM),
        "{output:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to serve as root"), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one readable line: {stderr}"
    );
}

#[test]
fn devices_command_prints_the_helper_table() {
    let helper = start_activated_helper("", None);
    let output = Command::new(bin("p2p-usb-agent"))
        .arg("--config")
        .arg(&helper.config)
        .arg("devices")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("KEY") && lines[0].contains("VID:PID") && lines[0].contains("PRODUCT")
    );
    assert!(
        table.contains("1-1/0525:a4a0/p2p-usb-sim-zero  0525:a4a0  high"),
        "{table}"
    );
    assert!(
        table.contains("0525:a4ac  full   p2p-usb simulator Boot Keyboard"),
        "{table}"
    );
}

#[test]
fn devices_command_fails_clearly_without_a_helper() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_sim_config(dir.path(), &dir.path().join("absent.sock"), 0, "");
    let output = Command::new(bin("p2p-usb-agent"))
        .arg("--config")
        .arg(&config)
        .arg("devices")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(p2p_usb_common::exit::UNAVAILABLE)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to the helper at") && stderr.contains("absent.sock"),
        "{stderr}"
    );
}

#[test]
fn agent_reports_ready_after_a_bounded_wait_when_the_helper_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_sim_config(dir.path(), &dir.path().join("absent.sock"), 0, "");
    let notify = NotifySocket::bind(dir.path());
    let mut agent = agent(&config, &notify, dir.path().join("agent.log"));
    let ready = notify.wait_for("READY=1", Duration::from_secs(20));
    assert!(ready.text.contains("STATUS=NodeId "), "{ready:?}");
    assert!(ready.text.contains("waiting for helper at"), "{ready:?}");
    assert!(ready.text.contains("absent.sock"), "{ready:?}");
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    agent.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(
        agent
            .wait_timeout(Duration::from_secs(10))
            .expect("stops")
            .success()
    );
}

#[test]
fn agent_survives_kill_9_of_the_helper_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("helper.sock");
    let config = write_sim_config(
        dir.path(),
        &socket,
        nix::unistd::geteuid().as_raw(),
        "[usb]\nauto_share = true\n",
    );
    let helper = start_listening_helper(dir.path(), &config, &socket, None);
    wait_for_path(&socket, Duration::from_secs(10));
    let notify = NotifySocket::bind(dir.path());
    let mut agent = agent(&config, &notify, dir.path().join("agent.log"));
    let ready = notify.wait_for("READY=1", Duration::from_secs(15));
    assert!(
        ready.text.contains(": 2 devices shared, 0 clients\n"),
        "{ready:?}"
    );

    helper.signal(Signal::SIGKILL);
    drop(helper);
    let seen = notify.len();
    notify.wait_for_text(
        seen,
        "0 devices shared, 0 clients; waiting for helper at",
        Duration::from_secs(10),
    );

    let seen = notify.len();
    let _restarted = start_listening_helper(dir.path(), &config, &socket, None);
    notify.wait_for_text(
        seen,
        ": 2 devices shared, 0 clients\n",
        Duration::from_secs(15),
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "agent kept running"
    );
    agent.signal(Signal::SIGTERM);
    assert!(
        agent
            .wait_timeout(Duration::from_secs(10))
            .expect("stops")
            .success(),
        "{}",
        agent.output()
    );
}

#[test]
fn an_agent_run_by_a_user_keeps_its_state_in_the_users_own_directories() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if !is_root() {
        eprintln!(
            "needs root to run the agent as another user; the path rules are unit-tested in net-agent's paths module"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (home, runtime) = (dir.path().join("home"), dir.path().join("run"));
    for owned in [&home, &runtime] {
        std::fs::create_dir(owned).unwrap();
        std::os::unix::fs::chown(owned, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(owned, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlog_level = \"warn\"\n[helper]\nsocket = \"{}\"\n[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"127.0.0.1:0\"\ndns_discovery = false\n",
            dir.path().join("helper.sock").display()
        ),
    )
    .unwrap();
    let as_user = |args: &[&str]| {
        let mut command = Command::new(bin("p2p-usb-agent"));
        command
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_clear()
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime)
            .uid(NOBODY)
            .gid(NOBODY);
        command
    };
    let agent = Process::spawn(as_user(&["serve"]), dir.path().join("agent.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let id = loop {
        if let Some(id) = agent
            .output()
            .lines()
            .find_map(|l| l.strip_prefix("Server NodeId: "))
        {
            break id.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no NodeId line:\n{}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let key = home.join(".local/state/p2p-usb/secret.key");
    let meta = std::fs::metadata(&key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o600));
    assert!(runtime.join("p2p-usb-agent/control.sock").exists());
    // The user's commands reach the user's own agent.
    let asked = as_user(&["id"]).output().unwrap();
    assert!(asked.status.success(), "{asked:?}");
    assert_eq!(String::from_utf8_lossy(&asked.stdout).trim(), id);
}
