"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const fileInput = $("file"), drop = $("drop"), urlForm = $("url-form"), urlInput = $("url");
  const urlButton = $("url-button"), statusEl = $("status"), resultEl = $("result");
  const figure = $("figure"), preview = $("preview"), caption = $("caption");
  const list = $("predictions"), meta = $("meta"), keyBox = $("key-box"), keyInput = $("key");
  const endpoint = "analyze";  // relative, so the page also works behind a path prefix
  let controller = null, previewUrl = null;

  function setStatus(text, kind) {
    statusEl.textContent = text;
    statusEl.className = "status" + (kind ? " " + kind : "");
    resultEl.parentElement.setAttribute("aria-busy", kind === "busy" ? "true" : "false");
  }

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    if (file) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      preview.alt = "Preview of the chosen image, " + file.name;
      caption.textContent = file.name;
    } else {
      preview.removeAttribute("src");
    }
    figure.hidden = !file;
    resultEl.classList.toggle("no-preview", !file);
  }

  function percent(confidence) {
    const value = confidence * 100;
    return (value >= 10 || value === 0 ? value.toFixed(0) : value.toFixed(1)) + "%";
  }

  function render(body) {
    list.replaceChildren();
    const predictions = body.predictions || [];
    for (const p of predictions) {
      const row = document.createElement("li");
      row.className = "row";
      const emoji = document.createElement("span");
      emoji.className = "emoji";
      emoji.setAttribute("aria-hidden", "true");
      emoji.textContent = p.emoji || "";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      const track = document.createElement("div");
      track.className = "track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-label", p.label);
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "100");
      track.setAttribute("aria-valuenow", (p.confidence * 100).toFixed(1));
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = Math.max(0, Math.min(100, p.confidence * 100)).toFixed(1) + "%";
      track.append(bar);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = percent(p.confidence);
      row.append(emoji, label, track, pct);
      list.append(row);
    }
    if (!predictions.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "No label reached the confidence threshold.";
      list.append(li);
    }
    const info = (body.metadata && body.metadata.model_info) || {};
    const parts = [];
    if (info.model) parts.push("Model " + info.model + (info.framework ? " (" + info.framework + ")" : ""));
    if (info.device) parts.push("on " + info.device);
    const time = body.metadata && body.metadata.processing_time;
    if (typeof time === "number") parts.push("in " + (time < 1 ? Math.round(time * 1000) + " ms" : time.toFixed(2) + " s"));
    meta.textContent = parts.join(" · ");
    resultEl.hidden = false;
    const top = predictions[0];
    setStatus(top ? "Most likely: " + top.label + " (" + percent(top.confidence) + ")."
                  : "Done; nothing above the threshold.");
  }

  async function analyze(request, what) {
    if (controller) controller.abort();
    const mine = controller = new AbortController();
    urlButton.disabled = true;
    list.replaceChildren();
    meta.textContent = "";
    resultEl.hidden = figure.hidden;  // keep showing the preview while waiting
    setStatus("Analyzing " + what + "…", "busy");
    let response, body = null;
    try {
      const key = keyInput.value.trim();
      const headers = key ? { Authorization: "Bearer " + key } : {};
      response = await fetch(request.url, { ...request.init, headers, signal: mine.signal });
      try { body = await response.json(); } catch (e) { body = null; }
    } catch (error) {
      if (mine.signal.aborted) return;
      setStatus("Could not reach the service. Check your connection and that the service is running, then try again.", "error");
      return;
    } finally {
      if (controller === mine) { controller = null; urlButton.disabled = false; }
    }
    if (mine.signal.aborted) return;
    if (response.ok && body && body.status === "success") return render(body);
    const message = body && body.error && body.error.message;
    if (response.status === 401) { keyBox.open = true; keyInput.focus(); }
    setStatus(message ? "Sorry, that did not work: " + message
                      : "Sorry, the service answered with an error (HTTP " + response.status + ").", "error");
  }

  function analyzeFile(file) {
    if (!file) return;
    showPreview(file);
    const form = new FormData();
    form.append("file", file, file.name || "image");
    analyze({ url: endpoint, init: { method: "POST", body: form } }, file.name || "the image");
  }

  function analyzeUrl(url) {
    showPreview(null);  // the page never loads a foreign URL itself; the service fetches it
    analyze({ url: endpoint + "?url=" + encodeURIComponent(url), init: { method: "GET" } }, "the link");
  }

  fileInput.addEventListener("change", () => { analyzeFile(fileInput.files[0]); fileInput.value = ""; });

  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => {
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) return analyzeFile(file);
    const text = event.dataTransfer && event.dataTransfer.getData("text/uri-list");
    if (text) { urlInput.value = text.split("\n")[0].trim(); analyzeUrl(urlInput.value); }
  });
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  urlForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const url = urlInput.value.trim();
    if (url) analyzeUrl(url);
  });

  document.addEventListener("paste", (event) => {
    const items = event.clipboardData ? [...event.clipboardData.files] : [];
    const image = items.find((file) => file.type.startsWith("image/"));
    if (image) { event.preventDefault(); analyzeFile(image); return; }
    if (event.target === urlInput) return;  // a normal paste into the URL field
    const text = event.clipboardData && event.clipboardData.getData("text").trim();
    if (/^https?:\/\/\S+$/i.test(text || "")) { event.preventDefault(); urlInput.value = text; analyzeUrl(text); }
  });
})();
