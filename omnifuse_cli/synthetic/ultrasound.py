"""Ultrasound views: a sector-scan B-mode liver renderer whose lesion pattern (dark masses,
bright nodules) follows a severity, with speckle, parenchymal texture, gain changes and vessels
as the noise, and the PNGs of one patient's views."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from omnifuse_cli.synthetic.spec import CohortSpec, severities

DYNAMIC_RANGE_DB = 48.0  # of the displayed B-mode image
US_ONSET = 3.0  # dark masses appear late: burden s^US_ONSET
US_DARK_RATE = 4.0  # expected dark masses per view at the most severe class
US_BRIGHT_RATE = 0.5  # expected extra bright nodules per view at mid severity
US_VESSEL_RATE = 0.8  # expected vessels per view at us_noise 1


def us_drivers(severity: np.ndarray) -> np.ndarray:
    """(n, 3) for severities (n,): mass size, dark-mass burden (late, convex) and
    bright-nodule burden (mid)."""
    return np.stack([severity, severity**US_ONSET, np.sin(np.pi * severity)], axis=1)


class UltrasoundRenderer:
    """Sector-scan B-mode liver views; the fan geometry is computed once, so views are cheap."""

    HALF_ANGLE = math.radians(31)

    def __init__(self, spec: CohortSpec) -> None:
        self.spec = spec
        self.centre = us_drivers(severities(spec.num_classes)).mean(axis=0)  # class average
        size = spec.image_size
        self.size = size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.yy, self.xx = yy, xx
        self.apex = (-0.08 * size, (size - 1) / 2)  # (y, x): the probe face is above the image
        self.r0, self.r1 = 0.14 * size, 0.98 * size
        r = np.hypot(yy - self.apex[0], xx - self.apex[1])
        self.theta = np.arctan2(xx - self.apex[1], yy - self.apex[0])
        self.depth = np.clip((r - self.r0) / (self.r1 - self.r0), 0.0, 1.0)
        soft = 1.5 / size  # radians, about a pixel and a half at the bottom: no jagged edge
        self.fan = (
            np.clip((self.HALF_ANGLE - np.abs(self.theta)) / (2 * soft), 0, 1)
            * np.clip((r - self.r0) / 1.5, 0, 1)
            * np.clip((self.r1 - r) / 1.5, 0, 1)
        )
        # Speckle = magnitude of a blurred complex Gaussian field (Rayleigh distributed); the
        # point spread is wider laterally than axially, as with a real transducer.
        scale = size / 256
        self.psf_axial = _gaussian_taps(0.7 * scale)
        self.psf_lateral = _gaussian_taps(1.4 * scale)

    def write_patient(
        self, severity: float, rng: np.random.Generator, out_dir: Path, pid: str
    ) -> list[str]:
        most = self.spec.images_per_patient
        count = most if rng.random() < 0.7 else int(rng.integers(1, most + 1))
        paths = []
        for k in range(1, count + 1):
            relative = f"us/{pid}_{k}.png"
            pixels = self.render(severity, self.spec.us_signal, rng)
            Image.fromarray(pixels, mode="L").save(out_dir / relative)
            paths.append(relative)
        return paths

    def render(self, severity: float, signal: float, rng: np.random.Generator) -> np.ndarray:
        """One view (uint8) whose lesion pattern lies ``signal`` of the way from the
        class-average pattern to the pattern of ``severity``."""
        size, noise = self.size, self.spec.us_noise
        # Interpolating (rather than showing another class's pattern now and then) keeps the
        # evidence graded: a weak view is ambiguous, not confidently wrong.
        drivers = us_drivers(np.array([severity]))[0]
        mass_size, dark, bright = self.centre + signal * (drivers - self.centre)

        tissue = np.full((size, size), 0.5, dtype=np.float32)
        tissue *= np.exp(
            0.15 * noise * self._smooth_noise(rng, 6) + 0.08 * noise * self._smooth_noise(rng, 24)
        )
        bounds = self._layers(tissue, rng)
        for _ in range(rng.poisson(0.05 + US_DARK_RATE * dark)):
            radius = size * (0.035 + 0.06 * mass_size) * rng.uniform(0.7, 1.3)
            self._blob(
                tissue,
                rng,
                bounds,
                radius,
                gain=0.6 - 0.45 * mass_size,
                irregular=0.3 * mass_size,
                edge=0.05 + 0.1 * mass_size,
            )
        for _ in range(rng.poisson(0.1 + US_BRIGHT_RATE * bright)):
            radius = size * rng.uniform(0.022, 0.045)
            self._blob(
                tissue,
                rng,
                bounds,
                radius,
                gain=3.5 * rng.uniform(0.8, 1.2),
                irregular=0.05,
                edge=0.08,
            )
        # Vessels: anechoic, bright-walled, in every liver; they mimic small dark lesions.
        for _ in range(rng.poisson(US_VESSEL_RATE * noise)):
            radius = size * rng.uniform(0.015, 0.04)
            self._blob(
                tissue,
                rng,
                bounds,
                radius,
                gain=0.12,
                irregular=0.0,
                edge=0.06,
                elongation=rng.uniform(1.0, 2.5),
                wall=0.8,
            )

        gain = math.exp(0.12 * noise * rng.standard_normal())
        attenuation = rng.uniform(0.6, 1.0)  # partly undone by time-gain compensation
        tissue *= gain * np.exp(-attenuation * self.depth) * (1 + 0.35 * self.depth)
        if noise > 0:
            # Uniform draws are several times cheaper than normal ones, and the blur sums
            # dozens of them, which makes the field Gaussian anyway.
            field = rng.random((2, size, size), dtype=np.float32) - np.float32(0.5)
            field = _blur(_blur(field, self.psf_axial, axis=1), self.psf_lateral, axis=2)
            speckle = np.hypot(field[0], field[1])
            speckle /= speckle.mean()
            tissue *= 1 + min(noise, 1.0) * (speckle - 1)
        # Log compression over a fixed dynamic range, as the scanner displays it, with plain
        # parenchyma at mid-gray; then the fan on black.
        decibels = 20 * np.log10(np.maximum(tissue, 1e-4) / 0.5)
        pixels = np.clip(0.5 + decibels / DYNAMIC_RANGE_DB, 0, 1) * self.fan
        return (pixels * 255 + 0.5).astype(np.uint8)

    def _smooth_noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        small = Image.fromarray(rng.standard_normal((cells, cells), dtype=np.float32), mode="F")
        return np.asarray(small.resize((self.size, self.size), Image.Resampling.BICUBIC))

    def _layers(self, tissue: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
        """Abdominal wall, bright capsule and diaphragm; returns the parenchyma's depth range."""
        capsule = rng.uniform(0.10, 0.16) + rng.uniform(-0.04, 0.04) * self.theta
        wall = self.depth < capsule
        bands = 0.4 * (1 + 0.6 * np.sin(self.depth * rng.uniform(50, 80) + rng.uniform(0, 6)))
        tissue[wall] = bands[wall]
        tissue *= 1 + 2.0 * np.exp(-(((self.depth - capsule) / 0.008) ** 2))
        diaphragm = rng.uniform(0.86, 0.94) - 0.08 * self.theta**2 * rng.uniform(0, 3)
        tissue *= 1 + 2.0 * np.exp(-(((self.depth - diaphragm) / 0.012) ** 2))
        tissue[self.depth > diaphragm + 0.02] *= 0.3  # lung behind the diaphragm
        return float(capsule.mean()) + 0.06, float(diaphragm.mean()) - 0.08

    def _blob(
        self,
        tissue: np.ndarray,
        rng: np.random.Generator,
        bounds: tuple[float, float],
        radius: float,
        *,
        gain: float,
        irregular: float,
        edge: float,
        elongation: float = 1.0,
        wall: float = 0.0,
    ) -> None:
        """A soft-edged, possibly irregular ellipse multiplying the echo by ``gain`` inside."""
        size = self.size
        top, bottom = bounds
        depth = rng.uniform(top, max(top, bottom))
        angle = rng.uniform(-0.8, 0.8) * self.HALF_ANGLE
        r = self.r0 + depth * (self.r1 - self.r0)
        cy, cx = self.apex[0] + r * math.cos(angle), self.apex[1] + r * math.sin(angle)
        rx = radius * math.sqrt(elongation) * rng.uniform(0.8, 1.25)
        ry = radius / math.sqrt(elongation)
        reach = 1.6 * max(rx, ry) * (1 + irregular)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, size)
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, size)
        if y0 >= y1 or x0 >= x1:
            return
        dy, dx = self.yy[y0:y1, x0:x1] - cy, self.xx[y0:y1, x0:x1] - cx
        phi = rng.uniform(0, np.pi)
        u = (dx * math.cos(phi) + dy * math.sin(phi)) / rx
        v = (-dx * math.sin(phi) + dy * math.cos(phi)) / ry
        dist = np.hypot(u, v)
        if irregular > 0:  # lobulated border: the radius wobbles with the polar angle
            alpha = np.arctan2(v, u)
            wobble = 0.6 * np.sin(3 * alpha + rng.uniform(0, 6)) + 0.4 * np.sin(
                5 * alpha + rng.uniform(0, 6)
            )
            dist = dist / (1 + irregular * wobble)
        mask = 1 / (1 + np.exp(np.clip((dist - 1) / edge, -50, 50)))
        region = tissue[y0:y1, x0:x1]
        region *= 1 + (gain - 1) * mask
        if wall:
            region *= 1 + wall * np.exp(-(((dist - 1.05) / 0.08) ** 2))


def _gaussian_taps(sigma: float) -> np.ndarray:
    half = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(field: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Convolution along one axis by shifted adds: a few taps, far cheaper than an FFT."""
    half = len(taps) // 2
    pad = [(0, 0)] * field.ndim
    pad[axis] = (half, half)
    padded = np.pad(field, pad, mode="wrap")
    length = field.shape[axis]
    out = np.zeros_like(field)
    index: list[slice] = [slice(None)] * field.ndim
    for k, weight in enumerate(taps):
        index[axis] = slice(k, k + length)
        out += weight * padded[tuple(index)]
    return out
