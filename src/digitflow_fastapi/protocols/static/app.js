// digitflow page: draw or upload digits, show the model's input, prediction and probabilities.
"use strict";

(function () {
  const predictUrl = document.querySelector("main").dataset.predictUrl;
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const results = document.getElementById("results");
  const statusLine = document.getElementById("status");
  const template = document.getElementById("result-template");
  const fileInput = document.getElementById("files");
  const drop = document.getElementById("drop");
  let drawing = false;
  let hasInk = false;
  let last = null;

  // --- drawing: pointer events cover mouse, touch and pen -------------------------------------
  function point(event) {
    const box = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * pad.width) / box.width,
      y: ((event.clientY - box.top) * pad.height) / box.height,
    };
  }

  function stroke(from, to) {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 20;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    hasInk = true;
  }

  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    stroke(last, last);
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    event.preventDefault();
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  function endStroke(event) {
    if (!drawing) return;
    drawing = false;
    if (pad.hasPointerCapture(event.pointerId)) pad.releasePointerCapture(event.pointerId);
    predictDrawing();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  function clearPad() {
    ctx.clearRect(0, 0, pad.width, pad.height);
    hasInk = false;
    const live = results.querySelector("li[data-source='drawing']");
    if (live) live.remove();
    setStatus("Canvas cleared. Draw a digit.");
  }

  function predictDrawing() {
    if (!hasInk) {
      setStatus("Draw a digit first.");
      return;
    }
    // Dark strokes on a transparent background, exactly as the canvas exports them.
    pad.toBlob((blob) => {
      if (blob) send(new File([blob], "drawing.png", { type: "image/png" }), "drawing");
    }, "image/png");
  }

  document.getElementById("predict-drawing").addEventListener("click", predictDrawing);
  document.getElementById("clear").addEventListener("click", clearPad);
  pad.addEventListener("keydown", (event) => {
    if (event.key === "Enter") predictDrawing();
    if (event.key === "Escape" || event.key === "Delete" || event.key === "Backspace") clearPad();
  });

  // --- uploads: drop zone and file picker -----------------------------------------------------
  function sendFiles(list) {
    const files = Array.from(list || []);
    if (files.length === 0) return;
    setStatus(`Sending ${files.length} file${files.length > 1 ? "s" : ""}…`);
    files.forEach((file) => send(file, "upload"));
  }

  document.getElementById("choose").addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    sendFiles(fileInput.files);
    fileInput.value = "";
  });
  drop.addEventListener("click", () => fileInput.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      fileInput.click();
    }
  });
  ["dragenter", "dragover"].forEach((name) =>
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    })
  );
  ["dragleave", "drop"].forEach((name) =>
    drop.addEventListener(name, () => drop.classList.remove("over"))
  );
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    sendFiles(event.dataTransfer && event.dataTransfer.files);
  });
  document.getElementById("clear-results").addEventListener("click", () => {
    results.replaceChildren();
    setStatus("Results cleared.");
  });

  // --- talking to the API ---------------------------------------------------------------------
  function setStatus(text) {
    statusLine.textContent = text;
  }

  function plainError(status, name) {
    const quoted = `“${name}”`;
    if (status === 415) return `${quoted} is not an image the model can read. Use a PNG, JPEG, WebP, BMP or GIF file.`;
    if (status === 413) return `${quoted} is too large for the server.`;
    if (status === 400) return `${quoted} could not be read as an image: it may be damaged or empty.`;
    if (status === 503) return "The model is still loading. Try again in a moment.";
    if (status === 0) return `Could not reach the server to send ${quoted}. Is it running?`;
    return `The server could not predict ${quoted} (HTTP ${status}).`;
  }

  async function send(file, source) {
    const item = newResult(file.name, source);
    const form = new FormData();
    form.append("image_file", file, file.name);
    let response;
    try {
      response = await fetch(`${predictUrl}?probabilities=true&explain=true`, {
        method: "POST",
        body: form,
      });
    } catch (err) {
      showError(item, plainError(0, file.name), "");
      return;
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok || !body || !Array.isArray(body.data)) {
      const detail = body && typeof body.detail === "string" ? body.detail : "";
      showError(item, plainError(response.status, file.name), detail);
      return;
    }
    showPrediction(item, body.data[0]);
  }

  function newResult(name, source) {
    if (source === "drawing") {
      const old = results.querySelector("li[data-source='drawing']");
      if (old) old.remove();
    }
    const item = template.content.firstElementChild.cloneNode(true);
    item.dataset.source = source;
    item.dataset.state = "pending";
    item.querySelector(".name").textContent = source === "drawing" ? `Your drawing` : name;
    item.querySelector(".digit").textContent = "…";
    results.prepend(item);
    return item;
  }

  function showError(item, message, detail) {
    item.dataset.state = "error";
    const box = document.createElement("div");
    box.className = "error";
    box.append(Object.assign(document.createElement("p"), { textContent: message }));
    if (detail) {
      const why = Object.assign(document.createElement("p"), { className: "detail" });
      why.textContent = `Server said: ${detail}`;
      box.append(why);
    }
    item.querySelector(".result-body").replaceWith(box);
    item.setAttribute("role", "alert");
    setStatus(message);
  }

  function showPrediction(item, entry) {
    const probabilities = entry.probabilities || [];
    const digit = entry.prediction;
    item.dataset.state = "done";
    item.dataset.prediction = digit;
    item.querySelector(".digit").textContent = digit;
    const top = probabilities[Number(digit)];
    item.querySelector(".confidence").textContent =
      typeof top === "number" ? `(${(top * 100).toFixed(1)}% sure)` : "";
    drawInput(item.querySelector("canvas.seen"), entry.model_input);
    const bars = item.querySelector(".bars");
    probabilities.forEach((p, index) => {
      const li = document.createElement("li");
      if (String(index) === String(digit)) li.className = "top";
      const label = document.createElement("span");
      label.textContent = String(index);
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = `${Math.max(0, Math.min(100, p * 100)).toFixed(1)}%`;
      track.appendChild(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = `${(p * 100).toFixed(1)}%`;
      li.append(label, track, pct);
      li.setAttribute("aria-label", `digit ${index}: ${(p * 100).toFixed(1)} percent`);
      bars.appendChild(li);
    });
    setStatus(`${item.querySelector(".name").textContent}: predicted ${digit}.`);
  }

  function drawInput(canvas, grid) {
    if (!Array.isArray(grid)) return;
    const c = canvas.getContext("2d");
    const image = c.createImageData(28, 28);
    grid.forEach((row, y) =>
      row.forEach((value, x) => {
        const v = Math.round(Math.max(0, Math.min(1, value)) * 255);
        const i = (y * 28 + x) * 4;
        image.data[i] = v;
        image.data[i + 1] = v;
        image.data[i + 2] = v;
        image.data[i + 3] = 255;
      })
    );
    c.putImageData(image, 0, 0);
  }

  // Every handler above is wired: say so, so that tests (and anything scripting the page) wait for
  // this rather than for a network lull, which says nothing about the handlers.
  document.documentElement.dataset.ready = "true";
})();
