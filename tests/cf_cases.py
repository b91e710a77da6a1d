"""Compact CounterFact records (the shared data's format) for the evaluation tests on tiny models."""

COMPACT_CASES = [
    dict(case_id=3, prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
         target_new="English", ground_truth="French", rephrase_prompt="Danielle Darrieux speaks",
         locality_prompt="Michel Rocard is a native speaker of", locality_ground_truth="French"),
    dict(case_id=11, prompt="Toyota is headquartered in", subject="Toyota", target_new="Spain",
         ground_truth="Japan", rephrase_prompt="The headquarters of Toyota are in",
         locality_prompt="Honda is headquartered in", locality_ground_truth="Japan"),
    dict(case_id=12, prompt="Miles Davis plays the", subject="Miles Davis", target_new="piano",
         ground_truth="trumpet", rephrase_prompt="Miles Davis is known for playing the",
         locality_prompt="Louis Armstrong plays the", locality_ground_truth="trumpet"),
    dict(case_id=20, prompt="Berlin is the capital of", subject="Berlin", target_new="Italy",
         ground_truth="Germany", rephrase_prompt="The city of Berlin is the capital of",
         locality_prompt="Paris is the capital of", locality_ground_truth="France"),
]
