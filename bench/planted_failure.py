"""gpu_check's planted failure for its tests stage: the driver adds this file to pytest's arguments only when
GPU_CHECK_PLANT_FAILURE names the tests stage (its name matches no test file pattern, so nothing else collects
it). The stage must then report this test as its first error, and the stages after it must still run."""


def test_planted_failure():
    raise AssertionError("planted failure (GPU_CHECK_PLANT_FAILURE=tests): the tests stage must report it")
