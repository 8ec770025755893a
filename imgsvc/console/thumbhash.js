// ThumbHash decoding (the format of github.com/evanw/thumbhash): a few bytes -> a tiny RGBA image.
// Header: 24 bits of L/P/Q averages, L scale and an alpha flag; 16 bits of L's cosine count on the short
// side, P/Q scales and a landscape flag; with alpha, one byte of A's average and scale; then one nibble
// per cosine coefficient: L (lx by ly, triangular), P and Q (3 by 3), A (5 by 5).

/** bytes of a base64 (or base64url) string */
export function base64Bytes(text) {
  const plain = text.replace(/-/g, "+").replace(/_/g, "/");
  return Uint8Array.from(atob(plain), (c) => c.charCodeAt(0));
}

/** { w, h, rgba } of the placeholder a ThumbHash describes (at most 32 pixels on its long side) */
export function decodeThumbHash(hash) {
  if (hash.length < 5) throw new Error("a ThumbHash has at least 5 bytes");
  const head = hash[0] | (hash[1] << 8) | (hash[2] << 16);
  const head2 = hash[3] | (hash[4] << 8);
  const hasAlpha = (head >> 23) & 1;
  const landscape = (head2 >> 15) & 1;
  const longSide = hasAlpha ? 5 : 7;
  const shortSide = head2 & 7;
  const lx = Math.max(3, landscape ? longSide : shortSide);
  const ly = Math.max(3, landscape ? shortSide : longSide);
  const ratio = (landscape ? longSide : shortSide) / (landscape ? shortSide : longSide);
  const w = Math.round(ratio > 1 ? 32 : 32 * ratio);
  const h = Math.round(ratio > 1 ? 32 / ratio : 32);

  let nibble = 0;
  const start = hasAlpha ? 6 : 5;
  // The coefficients of one channel: nx by ny cosines in a triangle, without the constant term.
  const coefficients = (nx, ny, scale) => {
    const out = [];
    for (let cy = 0; cy < ny; cy++) {
      for (let cx = cy ? 0 : 1; cx * ny < nx * (ny - cy); cx++, nibble++) {
        const byte = hash[start + (nibble >> 1)];
        if (byte === undefined) throw new Error("truncated ThumbHash");
        out.push((((byte >> ((nibble & 1) * 4)) & 15) / 7.5 - 1) * scale);
      }
    }
    return out;
  };
  const l = coefficients(lx, ly, ((head >> 18) & 31) / 31);
  const p = coefficients(3, 3, (((head2 >> 3) & 63) / 63) * 1.25); // saturation boosted, as encoders expect
  const q = coefficients(3, 3, (((head2 >> 9) & 63) / 63) * 1.25);
  const a = hasAlpha ? coefficients(5, 5, (hash[5] >> 4) / 15) : [];
  const lAverage = (head & 63) / 63;
  const pAverage = ((head >> 6) & 63) / 31.5 - 1;
  const qAverage = ((head >> 12) & 63) / 31.5 - 1;
  const aAverage = hasAlpha ? (hash[5] & 15) / 15 : 1;

  const nx = Math.max(lx, hasAlpha ? 5 : 3);
  const ny = Math.max(ly, hasAlpha ? 5 : 3);
  const rgba = new Uint8ClampedArray(w * h * 4);
  const fx = new Float64Array(nx);
  const fy = new Float64Array(ny);
  // Sum one channel's cosines at a pixel (fx, fy hold that pixel's basis values).
  const sum = (coefs, rows, triangle) => {
    let total = 0;
    for (let cy = 0, j = 0; cy < rows; cy++) {
      for (let cx = cy ? 0 : 1; triangle(cx, cy); cx++, j++) total += coefs[j] * fx[cx] * fy[cy] * 2;
    }
    return total;
  };
  for (let y = 0, i = 0; y < h; y++) {
    for (let cy = 0; cy < ny; cy++) fy[cy] = Math.cos((Math.PI / h) * (y + 0.5) * cy);
    for (let x = 0; x < w; x++, i += 4) {
      for (let cx = 0; cx < nx; cx++) fx[cx] = Math.cos((Math.PI / w) * (x + 0.5) * cx);
      const lum = lAverage + sum(l, ly, (cx, cy) => cx * ly < lx * (ly - cy));
      const pv = pAverage + sum(p, 3, (cx, cy) => cx < 3 - cy);
      const qv = qAverage + sum(q, 3, (cx, cy) => cx < 3 - cy);
      const av = hasAlpha ? aAverage + sum(a, 5, (cx, cy) => cx < 5 - cy) : 1;
      const b = lum - (2 / 3) * pv;
      const r = (3 * lum - b + qv) / 2;
      rgba[i] = Math.round(255 * Math.min(1, Math.max(0, r)));
      rgba[i + 1] = Math.round(255 * Math.min(1, Math.max(0, r - qv)));
      rgba[i + 2] = Math.round(255 * Math.min(1, Math.max(0, b)));
      rgba[i + 3] = Math.round(255 * Math.min(1, Math.max(0, av)));
    }
  }
  return { w, h, rgba };
}

/** a data: URL (PNG) of the placeholder, for a CSS background */
export function thumbHashDataURL(text) {
  const { w, h, rgba } = decodeThumbHash(base64Bytes(text));
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  canvas.getContext("2d").putImageData(new ImageData(rgba, w, h), 0, 0);
  return canvas.toDataURL("image/png");
}

/** the CSS of a tile before its render arrives: the dominant colour at once, the ThumbHash's picture over it */
export function placeholderStyle(placeholder) {
  const style = {};
  const colour = placeholder?.dominant_color || placeholder?.average_color;
  if (colour) style.backgroundColor = colour;
  if (placeholder?.thumbhash) {
    try {
      style.backgroundImage = `url("${thumbHashDataURL(placeholder.thumbhash)}")`;
    } catch {
      // an unreadable hash leaves the colour
    }
  }
  return style;
}
