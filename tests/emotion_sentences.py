"""A labelled set written for the tests: five plain sentences per emotion."""

LABELLED = {
    "joy": [
        "I am so happy today, everything is wonderful!",
        "We won the championship and I could not be more delighted.",
        "What a beautiful morning, I love this sunshine.",
        "My best friend is getting married and I am thrilled for her.",
        "This is the best birthday party ever, thank you all so much!",
    ],
    "sadness": [
        "I miss my grandmother so much since she passed away.",
        "I feel lonely and nobody seems to care about me.",
        "He cried all night after his dog died.",
        "Our old house was sold and I feel heartbroken.",
        "I am so sad that the summer is over.",
    ],
    "anger": [
        "I am furious that they lied to me again!",
        "Stop yelling at me, you make me so angry!",
        "This is outrageous, I hate how unfair they are.",
        "I am sick of your excuses, get out of my house!",
        "How dare you insult my family like that!",
    ],
    "fear": [
        "I am terrified of what might happen tonight.",
        "There is someone outside the window and I am scared.",
        "I am afraid the plane is going to crash.",
        "The noise in the dark basement frightens me.",
        "I panic every time I think about the surgery.",
    ],
    "disgust": [
        "This food is rotten and it smells disgusting.",
        "The toilet was filthy and covered in vomit.",
        "That is gross, there are maggots in the garbage.",
        "His behaviour is revolting and makes me sick.",
        "Yuck, the milk has gone sour and lumpy.",
    ],
    "surprise": [
        "Wow, I did not expect to see you here!",
        "I can't believe it, they gave me a surprise party!",
        "What? You are moving to Japan tomorrow?",
        "Oh my god, I never saw that coming!",
        "No way, you actually won the lottery?",
    ],
    "neutral": [
        "The meeting is scheduled for three o'clock on Tuesday.",
        "Please put the documents on the second shelf.",
        "The train leaves from platform four.",
        "The report has twelve pages and two tables.",
        "Water boils at one hundred degrees Celsius.",
    ],
}
