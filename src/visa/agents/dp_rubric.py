"""Our rubric for DP (diversity perspective): a 1-5 rating of how much visual information an image holds.

Written for this project (the reference prompt and its example images are not public). It keeps the
structure METHOD.md describes: a scale from 1 to 5, eight perspectives, five worked examples (one
per level), and a fixed answer format whose last line is ``Final score: N`` (``最终评分：N`` in
Chinese), which :mod:`visa.agents.dp_parser` reads.

The examples describe freely licensed photos bundled in ``examples/images`` (see
``examples/LICENSES.md``). They are given as text: a judge that sees pixels still gets the scale
anchored by words, and a text-only judge (the embedded recipe) gets the same prompt as everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

PERSPECTIVES = {
    "en": (
        "Visual elements: how many kinds of things, how many of them, how they interact, how rare they are",
        "Detail and material: textures, surfaces, small parts that reward a closer look",
        "Context and story: what is happening, where, and what came before or after",
        "Emotion and atmosphere: mood, expressions, light and weather",
        "Culture and history: customs, symbols, places, events, writing",
        "Viewpoint and composition: framing, depth, perspective, arrangement",
        "Image type: photo, artwork, chart, document or screenshot, and how well it is made",
        "Dynamics and interaction: motion, actions, relations between people or objects",
    ),
    "zh": (
        "视觉元素：物体的种类、数量、相互关系和稀有程度",
        "细节与材质：纹理、表面、值得细看的小部件",
        "情境与故事：发生了什么、在哪里、前因后果",
        "情感与氛围：情绪、表情、光线与天气",
        "文化与历史：习俗、符号、地点、事件、文字",
        "视角与构图：取景、景深、透视、布局",
        "图像类型：照片、艺术作品、图表、文档或截图，以及制作质量",
        "动态与互动：运动、动作、人与物之间的关系",
    ),
}

SCALE = {
    "en": (
        "1: almost no information: a blank, uniform or badly degraded image, or a plain texture.",
        "2: little information: one simple subject or a few details, hard to read or with nothing to discuss.",
        "3: moderate information: a clear subject with some details and a little context.",
        "4: rich information: several elements, clear details and context; many questions can be asked.",
        (
            "5: very rich information: many interacting elements, fine details, context, culture or story; "
            "the image rewards long study from several perspectives."
        ),
    ),
    "zh": (
        "1分：几乎没有信息：空白、单调或严重损坏的图像，或单纯的纹理。",
        "2分：信息很少：一个简单的主体或少量细节，难以辨认或没什么可讨论的。",
        "3分：信息适中：主体清楚，有一些细节和少量背景。",
        "4分：信息丰富：多个元素，细节和背景清楚，可以提出很多问题。",
        "5分：信息非常丰富：许多相互关联的元素、精细的细节、背景、文化或故事；值得从多个角度长时间观察。",
    ),
}

INSTRUCTIONS = {
    "en": (
        "You rate how much visual information an image contains, on a scale from 1 to 5, for choosing "
        "training images for a vision-language model. Consider these eight perspectives:\n{perspectives}\n\n"
        "Scale:\n{scale}\n\n"
        "Answer format: one short line per perspective, then a last line exactly like "
        "'Final score: N' where N is a whole number from 1 to 5. Judge only what is in the image."
    ),
    "zh": (
        "你需要为视觉语言模型挑选训练图像，按1到5分评价一张图像包含多少视觉信息。请从以下八个角度考虑：\n"
        "{perspectives}\n\n评分标准：\n{scale}\n\n"
        "回答格式：每个角度写一行简短评价，最后一行严格写成“最终评分：N”，N为1到5的整数。只评价图像中的内容。"
    ),
}

FINAL_LINE = {"en": "Final score: {score}", "zh": "最终评分：{score}"}
IMAGE_INTRO = {"en": "Rate this image.", "zh": "请评价这张图像。"}
DESCRIPTION_INTRO = {
    "en": "You cannot see the image; rate it from this description.",
    "zh": "你看不到图像，请根据以下描述评分。",
}


@dataclass(frozen=True)
class Example:
    """One worked example: a photo from ``examples/images``, its description and the expected judgement."""

    photo: str
    score: int
    description: dict[str, str]
    judgement: dict[str, str]


EXAMPLES: tuple[Example, ...] = (
    Example(
        "brick.jpg",
        1,
        {
            "en": "A grayscale brick wall seen at an angle; the staggered bricks and mortar lines fill the whole frame.",
            "zh": "一面斜拍的灰度砖墙，交错的砖块和灰缝充满整个画面。",
        },
        {
            "en": "Elements: only bricks, one repeated pattern. Detail: some surface grain. Context: none. "
            "Emotion: none. Culture: none. Composition: plain perspective. Type: texture photo. "
            "Dynamics: none.",
            "zh": "元素：只有砖块，单一重复图案。细节：少量表面纹理。情境：无。情感：无。文化：无。"
            "构图：简单透视。类型：纹理照片。动态：无。",
        },
    ),
    Example(
        "clock.jpg",
        2,
        {
            "en": "A round wall clock on a plain gray wall, smeared sideways by camera motion so that its hands "
            "and numbers cannot be read.",
            "zh": "灰色墙上的一只圆形挂钟，因相机移动而横向模糊，指针和数字都无法辨认。",
        },
        {
            "en": "Elements: one object. Detail: lost to motion blur. Context: an indoor wall, nothing more. "
            "Emotion: none. Culture: none. Composition: centred, flat. Type: blurred grayscale photo. "
            "Dynamics: only the camera's motion.",
            "zh": "元素：一个物体。细节：被运动模糊抹去。情境：室内墙面。情感：无。文化：无。构图：居中、平淡。"
            "类型：模糊的灰度照片。动态：只有相机的抖动。",
        },
    ),
    Example(
        "coffee.jpg",
        3,
        {
            "en": "An espresso with light brown crema in a glossy dark red cup on a matching saucer, a small "
            "silver spoon beside it, on a worn wooden table, seen from above.",
            "zh": "俯拍的一杯意式浓缩咖啡，表面有浅棕色油脂，深红色亮釉杯子配同色碟子，旁边一把小银勺，放在旧木桌上。",
        },
        {
            "en": "Elements: cup, saucer, spoon, table. Detail: crema, glaze and wood grain are clear. "
            "Context: a café or kitchen. Emotion: calm, warm tones. Culture: coffee habit. "
            "Composition: simple top view. Type: sharp colour photo. Dynamics: none.",
            "zh": "元素：杯子、碟子、勺子、桌子。细节：油脂、釉面和木纹清楚。情境：咖啡馆或厨房。情感：平静、暖色调。"
            "文化：喝咖啡的习惯。构图：简单的俯视。类型：清晰的彩色照片。动态：无。",
        },
    ),
    Example(
        "motorcycle.jpg",
        4,
        {
            "en": "A red cruiser motorcycle with a chrome headlight, orange turn signals and a finned silver engine, "
            "parked in a garage; metal shelves with boxes, a red crate, a bench and part of a bicycle around it.",
            "zh": "一辆红色巡航摩托车停在车库里，镀铬大灯、橙色转向灯、带散热片的银色发动机；周围有放着纸箱的金属货架、"
            "红色箱子、长凳和半辆自行车。",
        },
        {
            "en": "Elements: a vehicle and many workshop objects. Detail: chrome, fins, brand lettering. "
            "Context: a private garage. Emotion: neutral. Culture: motorcycle culture, a brand name. "
            "Composition: side view with a busy background. Type: sharp colour photo. "
            "Dynamics: parked, no action.",
            "zh": "元素：一辆车和许多车间物品。细节：镀铬件、散热片、品牌字样。情境：私人车库。情感：中性。"
            "文化：摩托车文化、品牌名称。构图：侧面视角，背景丰富。类型：清晰的彩色照片。动态：停放，无动作。",
        },
    ),
    Example(
        "astronaut.jpg",
        5,
        {
            "en": "An official portrait of a smiling astronaut in an orange pressure suit with a mission patch and a "
            "name tag; an American flag behind her, a Space Shuttle model on one side and her helmet in the foreground.",
            "zh": "一位微笑的宇航员的官方肖像，身穿橙色压力服，佩有任务徽章和名牌；身后是美国国旗，一侧是航天飞机模型，"
            "前景放着她的头盔。",
        },
        {
            "en": "Elements: person, suit, flag, shuttle model, helmet, patch. Detail: readable patch names and "
            "name tag. Context: a space mission. Emotion: proud and friendly. Culture and history: the Space "
            "Shuttle era, national symbols. Composition: balanced studio portrait. Type: high-quality photo. "
            "Dynamics: posed, relations between the person and her mission objects.",
            "zh": "元素：人物、航天服、国旗、航天飞机模型、头盔、徽章。细节：徽章上的名字和名牌可以辨认。情境：航天任务。"
            "情感：自豪而友好。文化与历史：航天飞机时代、国家象征。构图：均衡的影棚肖像。类型：高质量照片。"
            "动态：摆拍，人物与任务物品之间有关联。",
        },
    ),
)

EXAMPLE_INTRO = {"en": "Examples:", "zh": "示例："}
EXAMPLE_IMAGE = {"en": "Image: {description}", "zh": "图像：{description}"}


def system_prompt(language: str = "en", *, examples: bool = True) -> str:
    """The rubric (and, by default, the five worked examples) as one system prompt."""
    if language not in INSTRUCTIONS:
        raise ValueError(f"unsupported rubric language '{language}'; available: {', '.join(INSTRUCTIONS)}")
    perspectives = "\n".join(f"{n}. {p}" for n, p in enumerate(PERSPECTIVES[language], 1))
    text = INSTRUCTIONS[language].format(perspectives=perspectives, scale="\n".join(SCALE[language]))
    if examples:
        blocks = [
            EXAMPLE_IMAGE[language].format(description=ex.description[language])
            + "\n"
            + ex.judgement[language]
            + "\n"
            + FINAL_LINE[language].format(score=ex.score)
            for ex in EXAMPLES
        ]
        text += "\n\n" + EXAMPLE_INTRO[language] + "\n\n" + "\n\n".join(blocks)
    return text
