"""Clinical notes: Chinese ultrasound-report sentences (openers, neutral history, findings at
five severity levels, closers), how a note mixes correct and random findings, and the typos
that text_noise adds."""

from __future__ import annotations

import numpy as np

from omnifuse_cli.synthetic.spec import CohortSpec

NO_FINDINGS_SHARE = 0.1  # of notes at text_noise 1

# Class c maps to one of five severity levels (C=3 -> normal, mild, severe).
_OPENERS = (
    "患者{sex}，{age}岁，因体检发现肝脏异常就诊。",
    "患者{sex}，{age}岁，因右上腹不适来院检查。",
    "患者{sex}，{age}岁，门诊复查。",
    "患者{sex}，{age}岁，因肝功能检查异常就诊。",
    "患者{sex}，{age}岁，外院超声检查后转诊。",
)
_NEUTRAL = (
    "患者神志清楚，精神可。",
    "既往体健，否认高血压病史。",
    "否认糖尿病、冠心病病史。",
    "饮食睡眠可，二便正常。",
    "否认药物及食物过敏史。",
    "查体：腹软，无压痛及反跳痛。",
    "心肺听诊未闻及明显异常。",
    "否认手术外伤史。",
    "否认吸烟饮酒史。",
    "家族史无特殊。",
    "生命体征平稳。",
    "双下肢无水肿。",
    "既往有胆囊结石病史，未行手术。",
    "否认输血史。",
    "患者已婚，育有一子。",
    "入院后完善相关检查。",
    "检查时患者配合良好。",
    "胆囊大小正常，壁光滑。",
    "脾脏大小形态正常。",
    "双肾未见明显异常。",
)
_CLOSERS = (
    "建议定期复查。",
    "嘱患者注意休息，清淡饮食。",
    "请结合临床及其他检查。",
    "随诊。",
)
_FINDINGS: tuple[tuple[str, ...], ...] = (
    (  # normal
        "肝脏形态大小正常，包膜光滑，实质回声均匀。",
        "肝内未见明显占位性病变。",
        "肝内血管走行清晰，门静脉不宽。",
        "超声提示：肝脏未见明显异常。",
        "患者无明显不适，本次为常规体检。",
        "肝脏各叶比例协调，回声细密均匀。",
    ),
    (  # minimal
        "肝实质回声稍增粗，分布欠均匀。",
        "肝内见点状强回声，考虑钙化灶。",
        "肝内见一小囊性无回声区，直径约{size}cm，边界清晰。",
        "超声提示：肝实质回声稍粗，建议随访。",
        "患者偶有右上腹隐痛不适。",
    ),
    (  # mild
        "肝内见一低回声小结节，大小约{size}cm，边界清。",
        "肝右叶见一稍高回声结节，形态规则，内部回声均匀。",
        "CDFI：结节内未见明显血流信号。",
        "超声提示：肝内实性小结节，考虑良性可能，建议定期复查。",
        "患者偶感右上腹胀痛，无发热。",
        "肝内见一高回声团，大小约{size}cm，考虑血管瘤。",
    ),
    (  # moderate
        "肝内见数个低回声结节，较大者约{size}cm，边界尚清。",
        "结节周边可见低回声晕，内部回声不均。",
        "CDFI：结节周边可见点条状血流信号。",
        "超声提示：肝内多发实性结节，性质待定，建议增强CT进一步检查。",
        "患者近一月乏力、食欲下降。",
    ),
    (  # severe
        "肝内多发低回声团块，最大约{size}cm，边界不清，形态不规则。",
        "团块内部回声不均，可见液化坏死区，血流信号丰富。",
        "门静脉内见低回声充填，考虑癌栓形成。",
        "肝门部及腹膜后见多发肿大淋巴结。",
        "超声提示：肝内多发占位，考虑恶性可能大。",
        "患者近期明显消瘦，体重下降约{kg}kg，伴腹胀、纳差。",
        "腹腔内见中等量积液。",
    ),
)
# Typos are drawn from frequent characters so they look like input-method slips, not garbage.
_TYPO_CHARS = "的一是了不在有人这中大为上个我以要时来用们生到作地于出就分对成会可主发年动同工也能"


def make_note(spec: CohortSpec, severity: float, rng: np.random.Generator) -> str:
    """A note whose correct findings describe ``severity``'s level (of five)."""
    classes, noise = spec.num_classes, spec.text_noise
    opener = _OPENERS[rng.integers(len(_OPENERS))].format(
        sex="男" if rng.random() < 0.5 else "女", age=int(rng.integers(25, 80))
    )
    n_neutral = int(rng.integers(1, 3) + rng.poisson(0.8 * noise))
    neutral = [_NEUTRAL[j] for j in rng.permutation(len(_NEUTRAL))[:n_neutral]]

    findings: list[str] = []
    if rng.random() >= min(0.9, NO_FINDINGS_SHARE * noise):  # else a note without findings
        used: set[str] = set()
        for _ in range(1 + rng.binomial(3, 0.5)):
            shown = severity
            if rng.random() >= spec.text_signal:
                shown = int(rng.integers(0, classes)) / (classes - 1)
            pool = _FINDINGS[round(shown * (len(_FINDINGS) - 1))]
            template = pool[rng.integers(len(pool))]
            if template in used:
                continue
            used.add(template)
            # Lesion sizes grow with severity, which separates classes sharing a level (C > 5).
            size_cm = (0.6 + 5.0 * shown) * rng.uniform(0.7, 1.3)
            findings.append(template.format(size=f"{size_cm:.1f}", kg=int(rng.integers(3, 12))))

    closer = [_CLOSERS[rng.integers(len(_CLOSERS))]] if rng.random() < 0.5 else []
    while 1 + len(neutral) + len(findings) + len(closer) > 8 and neutral:
        neutral.pop()  # notes are capped at eight sentences; findings are kept
    sentences = [opener, *neutral, *findings, *closer]
    while len(sentences) < 3:
        sentences.insert(1, _NEUTRAL[rng.integers(len(_NEUTRAL))])
    return _typos("".join(sentences), 0.03 * noise, rng)


def _typos(text: str, rate: float, rng: np.random.Generator) -> str:
    if rate <= 0:
        return text
    hits = rng.random(len(text)) < rate
    kinds = rng.integers(0, 3, len(text))
    subs = rng.integers(0, len(_TYPO_CHARS), len(text))
    out: list[str] = []
    start = 0
    # Only the few hit characters are visited; the text between them is copied in slices.
    for i in np.flatnonzero(hits).tolist():
        out.append(text[start:i])
        if kinds[i] == 0:
            out.append(_TYPO_CHARS[subs[i]])
        elif kinds[i] == 2:
            out.append(text[i] * 2)
        # kind 1: the character is dropped
        start = i + 1
    out.append(text[start:])
    return "".join(out)
