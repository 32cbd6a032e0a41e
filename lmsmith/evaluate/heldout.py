"""A fixed held-out text for perplexity: plain English paragraphs on varied topics, written for this
package (so no pretraining corpus contains them verbatim) and never used for calibration or training.

About 1,100 tokens with the SmolLM2 tokenizer (4 windows of 256): small enough that measuring a
135M model takes seconds on a CPU. The text is fixed, so two measurements differ only by the model
and small perplexity differences between compression methods are real, if not representative of
every kind of text.
"""
from __future__ import annotations

HELDOUT_PARAGRAPHS: tuple[str, ...] = (
    (
        "The village market opens before sunrise on Saturdays. Farmers arrive with crates of apples, "
        "potatoes and late tomatoes, and the baker sets out long loaves that are still warm. By eight "
        "o'clock the square is crowded with families, and the smell of coffee drifts from a small cart "
        "near the fountain. Most of the sellers have known each other for decades, and they trade news "
        "about the weather, the harvest and their grandchildren while they wait for customers."
    ),
    (
        "A refrigerator does not create cold; it moves heat from the inside of the box to the room around "
        "it. A pump compresses a gas until it becomes hot, and the coils at the back release that heat "
        "into the kitchen. The fluid then passes through a narrow valve, expands and cools sharply, and "
        "flows through pipes inside the cabinet, where it absorbs warmth from the food. The cycle repeats "
        "many times an hour, which is why the back of the appliance always feels warm."
    ),
    (
        "When the river flooded in the spring of that year, the town council met in the school gym because "
        "the town hall was under a meter of water. Volunteers filled sandbags for three days and nights. "
        "Afterwards, engineers recommended widening the channel and building a low wall along the eastern "
        "bank. The project took four years and cost more than expected, but the next flood, a decade "
        "later, stopped a few centimeters below the top of the new wall."
    ),
    (
        "Learning a second language as an adult is slower than it is for children, but adults have "
        "advantages of their own. They can study grammar deliberately, use dictionaries well and notice "
        "patterns that a child would absorb only after years of exposure. The most useful habit, according "
        "to many teachers, is daily practice: twenty minutes of reading or conversation every day does "
        "more than a long session once a week, because memory is strengthened by repetition over time."
    ),
    (
        "The old lighthouse stands on a rock about two kilometers from the shore. For more than a century "
        "a keeper lived there with his family, climbing the spiral staircase every evening to light the "
        "lamp and wind the clockwork that turned the lens. Today the light is automatic and powered by "
        "solar panels, and the keeper's cottage has become a small museum. Visitors can reach it by boat "
        "in summer, when the sea is calm enough to land at the narrow stone pier."
    ),
    (
        "Photosynthesis turns light into chemical energy. Inside the leaves of a plant, pigments absorb "
        "sunlight and use its energy to split water molecules, releasing oxygen into the air. The energy "
        "captured in this step is then used to build sugars from carbon dioxide. Those sugars feed the "
        "plant's growth and, directly or indirectly, nearly every animal on land. Forests, grasslands and "
        "the tiny algae floating in the oceans together produce most of the oxygen we breathe."
    ),
    (
        "The committee reviewed three proposals for the new library. The first kept the historic facade "
        "and added a glass reading room at the back; the second replaced the whole building with a modern "
        "design; the third moved the library to an empty warehouse near the station. After two public "
        "meetings and many letters from residents, the committee chose the first proposal, noting that it "
        "was neither the cheapest nor the largest, but the one most people said they would actually use."
    ),
    (
        "Good bread needs only flour, water, salt and yeast, yet bakers spend years learning to make it "
        "well. The dough must rest long enough for the yeast to produce gas and for the gluten to develop, "
        "and the oven must be hot enough to give the crust its color without drying the inside. Small "
        "changes in temperature or humidity alter the result, so experienced bakers adjust the recipe "
        "every day, often by feel rather than by measurement."
    ),
    (
        "Computer programs are easier to change when each part does one thing and says clearly what it "
        "needs. A function that reads a file, cleans the data, computes a statistic and prints a report "
        "is hard to test, because every check must go through all four steps. Splitting it into four "
        "small functions lets each one be tested on its own, and makes it obvious which part to change "
        "when the format of the file or the content of the report changes."
    ),
    (
        "The expedition left the coast in early March with twelve people, six sledges and food for ninety "
        "days. The first weeks were the hardest: storms kept them in their tents for days at a time, and "
        "one sledge broke through thin ice and had to be abandoned. By April the weather improved, and "
        "they covered thirty kilometers on a good day. They reached the far side of the ice sheet in late "
        "May, thinner and exhausted, but with every member of the team safe."
    ),
    (
        "Bees communicate the location of flowers through a dance performed on the vertical surface of the "
        "comb. The angle of the dance relative to straight up tells the other workers the direction of the "
        "food relative to the sun, and the length of the waggling run tells them how far away it is. "
        "Researchers who decoded this behavior in the last century were at first met with doubt, but many "
        "later experiments confirmed that the bees really do follow the directions they are given."
    ),
    (
        "A budget is less about restricting spending than about deciding in advance where money should go. "
        "People who write down their expected income and expenses for the month tend to save more, not "
        "because they earn more, but because they notice small recurring costs that would otherwise go "
        "unexamined. A simple rule that many advisers suggest is to set aside a fixed share of each "
        "paycheck as soon as it arrives, before any other spending decisions are made."
    ),
)


def heldout_text() -> str:
    """The held-out paragraphs joined by blank lines."""
    return "\n\n".join(HELDOUT_PARAGRAPHS)
