// The session page: replay player with seek/speed controls, commands that seek, the live view.
// Data comes from the page's <script type="application/json" id="player-data"> block (read with
// JSON.parse). Attacker text only ever reaches the page through textContent, never innerHTML.
"use strict";

(function () {
  const dataEl = document.getElementById("player-data");
  if (!dataEl) return;
  const data = JSON.parse(dataEl.textContent);
  const note = document.getElementById("player-note");
  const say = (el, text) => { if (el) el.textContent = text; };
  const hasPlayerLib = typeof window.AsciinemaPlayer !== "undefined" && window.AsciinemaPlayer.create;

  function formatTime(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "0:00.0";
    const m = Math.floor(seconds / 60);
    const s = seconds - m * 60;
    return m + ":" + (s < 10 ? "0" : "") + s.toFixed(1);
  }

  function parseTime(text) {
    // "75", "1:15", "1:15.5", "0:01:15"
    const parts = String(text).trim().split(":").map(Number);
    if (!parts.length || parts.some((n) => !isFinite(n) || n < 0)) return null;
    return parts.reduce((acc, n) => acc * 60 + n, 0);
  }

  // -- replay ------------------------------------------------------------------------------------------
  const el = document.getElementById("player");
  const playBtn = document.getElementById("pc-play");
  const timeEl = document.getElementById("pc-time");
  const speedSel = document.getElementById("pc-speed");
  const download = document.getElementById("pc-download");
  let player = null;
  let current = 0;
  let playing = false;
  let speed = 1;

  function setPlaying(value) {
    playing = value;
    say(playBtn, value ? "Pause" : "Play");
  }

  function create(index, startAt, autoPlay) {
    if (!el || !data.recordings.length) return;
    if (!hasPlayerLib) {
      say(note, "The replay player is missing (static/vendor): run scripts/web-assets.sh on the server.");
      return;
    }
    if (player) player.dispose();
    el.replaceChildren();
    current = index;
    const rec = data.recordings[index];
    player = window.AsciinemaPlayer.create(rec.url, el, {
      speed: speed,
      preload: true,
      autoPlay: !!autoPlay,
      startAt: startAt || 0,
      fit: "width",
      controls: true,
      terminalFontSize: "15px",
      theme: "asciinema",
    });
    player.addEventListener("playing", () => setPlaying(true));
    player.addEventListener("play", () => setPlaying(true));
    player.addEventListener("pause", () => setPlaying(false));
    player.addEventListener("ended", () => setPlaying(false));
    player.addEventListener("error", () => say(note, "The recording could not be loaded."));
    if (download) download.href = rec.url;
    document.querySelectorAll("#recording-tabs .tab").forEach((tab) => {
      tab.setAttribute("aria-pressed", String(Number(tab.dataset.recording) === index));
    });
    window.sandtrapPlayer = player; // for the browser tests and the console
  }

  function seek(seconds, index) {
    if (!player) return;
    seconds = Math.max(0, seconds);
    if (index !== undefined && index !== current) {
      create(index, seconds, true);
      return;
    }
    Promise.resolve(player.seek(seconds)).then(() => player.play());
  }

  function nudge(delta) {
    if (!player) return;
    const t = player.getCurrentTime() || 0;
    const d = player.getDuration();
    const target = typeof d === "number" ? Math.min(d, t + delta) : t + delta;
    Promise.resolve(player.seek(Math.max(0, target)));
  }

  if (el && data.recordings.length) {
    create(0, 0, false);
    if (playBtn) playBtn.addEventListener("click", () => {
      if (!player) return;
      if (playing) player.pause(); else player.play();
    });
    const back = document.getElementById("pc-back");
    const fwd = document.getElementById("pc-fwd");
    const start = document.getElementById("pc-start");
    if (back) back.addEventListener("click", () => nudge(-5));
    if (fwd) fwd.addEventListener("click", () => nudge(5));
    if (start) start.addEventListener("click", () => seek(0));
    if (speedSel) speedSel.addEventListener("change", () => {
      // The player takes its speed at creation: re-create it where it was.
      speed = Number(speedSel.value) || 1;
      const t = player ? player.getCurrentTime() || 0 : 0;
      create(current, t, playing);
    });
    const gotoEl = document.getElementById("pc-goto");
    if (gotoEl) gotoEl.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter") return;
      const t = parseTime(gotoEl.value);
      if (t === null) { say(note, "Go to: use seconds or m:ss"); return; }
      say(note, "");
      seek(t);
    });
    document.querySelectorAll("#recording-tabs .tab").forEach((tab) => {
      tab.addEventListener("click", () => create(Number(tab.dataset.recording), 0, false));
    });
    setInterval(() => {
      if (!player || !timeEl) return;
      const d = player.getDuration();
      timeEl.textContent = formatTime(player.getCurrentTime()) + (typeof d === "number" ? " / " + formatTime(d) : "");
    }, 200);
  }

  // Each command's button seeks its recording to the moment it was entered.
  const commandItems = document.querySelectorAll("#commands li");
  document.querySelectorAll("#commands button.seek").forEach((btn) => {
    btn.addEventListener("click", () => {
      const cmd = data.commands[Number(btn.dataset.command)];
      if (!cmd || cmd.offset === null || cmd.recording === null) return;
      commandItems.forEach((li) => li.classList.remove("active"));
      const li = btn.closest("li");
      if (li) li.classList.add("active");
      seek(cmd.offset, cmd.recording);
    });
  });

  // -- live ----------------------------------------------------------------------------------------------
  // A custom asciinema-player driver fed by the API's server-sent events: each message is a JSON frame
  // [t, kind, data] ("o" output text, "r" "COLSxROWS"); the "end" event closes it. The player's
  // terminal emulator renders the text; nothing of it is parsed as HTML.
  const live = data.live;
  const liveEl = document.getElementById("live-player");
  const liveStart = document.getElementById("live-start");
  const liveStop = document.getElementById("live-stop");
  const liveNote = document.getElementById("live-note");
  let livePlayer = null;
  let liveSource = null;

  function liveDriver(url, cols, rows) {
    return function ({ dispatch }) {
      let t0 = null;
      return {
        play() {
          if (liveSource) return true;
          dispatch("play");
          dispatch("reset", { size: { cols: cols, rows: rows } });
          dispatch("playing");
          t0 = performance.now();
          liveSource = new EventSource(url, { withCredentials: true });
          liveSource.addEventListener("open", () => say(liveNote, "connected"));
          liveSource.addEventListener("message", (ev) => {
            let frame;
            try { frame = JSON.parse(ev.data); } catch (e) { return; }
            if (!Array.isArray(frame) || frame.length < 3) return;
            const kind = frame[1];
            const text = typeof frame[2] === "string" ? frame[2] : "";
            if (kind === "o") {
              dispatch("output", text);
            } else if (kind === "r") {
              const m = /^(\d{1,4})x(\d{1,4})$/.exec(text);
              if (m) dispatch("resize", { cols: Number(m[1]), rows: Number(m[2]) });
            }
          });
          liveSource.addEventListener("end", () => {
            liveSource.close();
            liveSource = null;
            say(liveNote, "the session has ended");
            dispatch("ended", { message: "Session ended" });
            if (liveStop) liveStop.disabled = true;
          });
          liveSource.addEventListener("error", () => {
            if (liveSource && liveSource.readyState === EventSource.CLOSED) {
              say(liveNote, "the live stream closed");
            } else {
              say(liveNote, "reconnecting…");
            }
          });
          return true;
        },
        stop() {
          if (liveSource) liveSource.close();
          liveSource = null;
        },
        getCurrentTime() {
          return t0 === null ? 0 : (performance.now() - t0) / 1000;
        },
      };
    };
  }

  if (live && liveEl && liveStart) {
    liveStart.addEventListener("click", () => {
      if (!hasPlayerLib) { say(liveNote, "the player is missing (static/vendor)"); return; }
      if (livePlayer) livePlayer.dispose();
      liveEl.replaceChildren();
      livePlayer = window.AsciinemaPlayer.create(liveDriver(live.url, live.cols, live.rows), liveEl, {
        autoPlay: true,
        fit: "width",
        controls: false,
        cols: live.cols,
        rows: live.rows,
        terminalFontSize: "15px",
      });
      window.sandtrapLivePlayer = livePlayer;
      liveStart.disabled = true;
      if (liveStop) liveStop.disabled = false;
      say(liveNote, "connecting…");
    });
    if (liveStop) liveStop.addEventListener("click", () => {
      if (liveSource) liveSource.close();
      liveSource = null;
      liveStop.disabled = true;
      liveStart.disabled = false;
      say(liveNote, "stopped");
    });
  }
})();
